// A js-libp2p peer (TCP, Noise, Yamux, identify, ping) connects to the fieldmesh node whose
// multiaddr is given, identifies it, pings it three times and prints what it learnt as JSON.
// Usage: node identify-ping.mjs /ip4/127.0.0.1/tcp/PORT/p2p/PEER
import { createLibp2p } from 'libp2p'
import { tcp } from '@libp2p/tcp'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { identify } from '@libp2p/identify'
import { ping } from '@libp2p/ping'
import { multiaddr } from '@multiformats/multiaddr'

// Node.js 20 (Debian's) lacks Promise.withResolvers, which some js-libp2p dependencies use.
if (!Promise.withResolvers) {
  Promise.withResolvers = function () {
    let resolve, reject
    const promise = new Promise((res, rej) => { resolve = res; reject = rej })
    return { promise, resolve, reject }
  }
}

const target = process.argv[2]
if (!target) {
  console.error('usage: node identify-ping.mjs MULTIADDR')
  process.exit(2)
}
const timeout = setTimeout(() => {
  console.error('timed out')
  process.exit(1)
}, 20000)

const node = await createLibp2p({
  transports: [tcp()],
  connectionEncrypters: [noise()],
  streamMuxers: [yamux()],
  services: { identify: identify(), ping: ping() }
})

const identified = new Promise((resolve) => {
  node.addEventListener('peer:identify', (evt) => resolve(evt.detail))
})
const conn = await node.dial(multiaddr(target))
const info = await identified
const rtts = []
for (let i = 0; i < 3; i++) {
  rtts.push(await node.services.ping.ping(multiaddr(target)))
}
console.log(JSON.stringify({
  remotePeer: conn.remotePeer.toString(),
  encryption: conn.encryption,
  multiplexer: conn.multiplexer,
  agentVersion: info.agentVersion,
  protocolVersion: info.protocolVersion,
  protocols: info.protocols,
  rtts
}))
clearTimeout(timeout)
await node.stop()
process.exit(0)

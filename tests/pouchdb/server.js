// A PouchDB server on loopback, as a CHT deployment's CouchDB is seen by its phones: express-pouchdb
// over PouchDB's LevelDB adapter, gzip on (the `compression` middleware, as a CouchDB behind nginx
// serves CHT). Loads an NDJSON file of FHIR resources into the database `fhir` (each resource one
// document, `_id` = `Type/id`), then serves it.
//
//   node server.js --port 5985 --dir /tmp/x --load data.ndjson
//
// Prints `ready <port> <documents>` when it serves. `GET /_bench/bytes` answers the bytes read and
// written on every other connection so far (sockets counted at the TCP level, HTTP headers and
// compressed bodies included).
import fs from 'node:fs';
import readline from 'node:readline';
import express from 'express';
import compression from 'compression';
import expressPouchDB from 'express-pouchdb';
import PouchDB from 'pouchdb-node';

const arg = (name, dflt) => {
  const i = process.argv.indexOf(name);
  return i > 0 ? process.argv[i + 1] : dflt;
};
const port = Number(arg('--port', '5985'));
const dir = arg('--dir', '/tmp/fieldmesh-pouchdb-server');
const load = arg('--load');

fs.mkdirSync(dir, { recursive: true });
const Pouch = PouchDB.defaults({ prefix: dir.endsWith('/') ? dir : dir + '/' });
const db = new Pouch('fhir');
let count = 0;
if (load) {
  const lines = readline.createInterface({ input: fs.createReadStream(load), crlfDelay: Infinity });
  let batch = [];
  for await (const line of lines) {
    if (!line.trim()) continue;
    const r = JSON.parse(line);
    r._id = `${r.resourceType}/${r.id}`;
    batch.push(r);
    if (batch.length === 1000) {
      await db.bulkDocs(batch);
      count += batch.length;
      batch = [];
    }
  }
  if (batch.length) {
    await db.bulkDocs(batch);
    count += batch.length;
  }
}
const info = await db.info();

let done = { read: 0, written: 0 };
const live = new Set();
const app = express();
app.get('/_bench/bytes', (req, res) => {
  // This request's own connection is not counted, now or when it closes.
  req.socket.benchOnly = true;
  live.delete(req.socket);
  let read = done.read;
  let written = done.written;
  for (const s of live) {
    read += s.bytesRead;
    written += s.bytesWritten;
  }
  res.json({ read, written });
});
app.use(compression());
app.use('/', expressPouchDB(Pouch, { mode: 'minimumForPouchDB', logPath: `${dir}/log.txt` }));
const server = app.listen(port, '127.0.0.1', () => {
  console.log(`ready ${port} ${info.doc_count}`);
});
server.on('connection', (s) => {
  live.add(s);
  s.on('close', () => {
    live.delete(s);
    if (!s.benchOnly) {
      done.read += s.bytesRead;
      done.written += s.bytesWritten;
    }
  });
});

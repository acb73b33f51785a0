// A PouchDB client pulling a whole database, as a CHT phone's first sync does
// (`db.replicate.from(remote)`, PouchDB's defaults), into PouchDB's LevelDB adapter on disk.
//
//   node client.js --url http://127.0.0.1:5985/fhir --dir /tmp/y [--batch-size 100]
//
// Prints one JSON line: documents written, milliseconds the replication took, documents held, peak
// resident memory.
import fs from 'node:fs';
import PouchDB from 'pouchdb-node';

const arg = (name, dflt) => {
  const i = process.argv.indexOf(name);
  return i > 0 ? process.argv[i + 1] : dflt;
};
const url = arg('--url');
const dir = arg('--dir', '/tmp/fieldmesh-pouchdb-client');
const batchSize = Number(arg('--batch-size', '100'));
fs.rmSync(dir, { recursive: true, force: true });
fs.mkdirSync(dir, { recursive: true });
const local = new PouchDB(`${dir}/fhir`);
const t0 = process.hrtime.bigint();
const result = await local.replicate.from(url, { batch_size: batchSize });
const ms = Number(process.hrtime.bigint() - t0) / 1e6;
const info = await local.info();
// ru_maxrss: the peak resident memory of this process, in KiB.
const maxrssKib = process.resourceUsage().maxRSS;
console.log(
  JSON.stringify({ docs_written: result.docs_written, ms, held: info.doc_count, ok: result.ok, maxrss_kib: maxrssKib }),
);

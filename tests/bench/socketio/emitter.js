#!/usr/bin/env node
// Publishes market updates to Socket.IO rooms through Redis with
// @socket.io/redis-emitter; server.js (Redis adapter) delivers them.
//
//   node emitter.js [--redis redis://127.0.0.1:36379] [--rooms K] [--rate R]
//                   [--seconds S] [--markets M]
//
// Sends round(R*S) updates, paced at R/s total: update i goes to room
// ch{i % K} and carries market m{i % M}. Event "update" with one argument, a
// JSON string:
//   {"type":"update","market":"m3","version":17,"ts":<ms>,
//    "payload":{"sent_us":<us since epoch>,"home":1.95,"draw":3.4,"away":4.2}}
// (version counts per market from 1). At the end prints one JSON line
//   {"sent":N,"seconds":S,"elapsed":<actual s>,"max_lag_ms":<pacer lag>}
"use strict";

const { Emitter } = require("@socket.io/redis-emitter");
const { createClient } = require("redis");

function parseArgs(argv) {
  const opts = { redis: "redis://127.0.0.1:36379", rooms: 1, rate: 100, seconds: 10, markets: 1 };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const eq = a.indexOf("=");
    const key = eq > 0 ? a.slice(0, eq) : a;
    const val = () => (eq > 0 ? a.slice(eq + 1) : argv[++i]);
    switch (key) {
      case "--redis": opts.redis = val(); break;
      case "--rooms": opts.rooms = Number(val()); break;
      case "--rate": opts.rate = Number(val()); break;
      case "--seconds": opts.seconds = Number(val()); break;
      case "--markets": opts.markets = Number(val()); break;
      case "-h":
      case "--help":
        process.stdout.write(
          "usage: node emitter.js [--redis URL] [--rooms K] [--rate R] [--seconds S] [--markets M]\n");
        process.exit(0);
      default:
        process.stderr.write(`emitter.js: unknown argument ${a}\n`);
        process.exit(2);
    }
  }
  const bad = (m) => { process.stderr.write(`emitter.js: ${m}\n`); process.exit(2); };
  if (!Number.isInteger(opts.rooms) || opts.rooms < 1) bad("--rooms must be an integer >= 1");
  if (!Number.isInteger(opts.markets) || opts.markets < 1) bad("--markets must be an integer >= 1");
  if (!(opts.rate > 0) || !Number.isFinite(opts.rate)) bad("--rate must be > 0");
  if (!(opts.seconds > 0) || !Number.isFinite(opts.seconds)) bad("--seconds must be > 0");
  return opts;
}

// Wall clock with microsecond resolution: anchor the monotonic clock to the
// instant Date.now() ticks over to a new millisecond, so the anchor is exact
// to within a few microseconds (Date.now() alone only has ms resolution).
function makeWallClockUs() {
  const t0 = Date.now();
  let t;
  let h;
  do {
    t = Date.now();
    h = process.hrtime.bigint();
  } while (t === t0);
  const anchorUs = BigInt(t) * 1000n;
  return () => Number(anchorUs + (process.hrtime.bigint() - h) / 1000n);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function main() {
  const opts = parseArgs(process.argv.slice(2));

  const client = createClient({ url: opts.redis });
  client.on("error", (err) => process.stderr.write(`emitter.js: redis: ${err.message}\n`));
  await client.connect();
  const io = new Emitter(client);

  const nowUs = makeWallClockUs();
  const rooms = Array.from({ length: opts.rooms }, (_, i) => `ch${i}`);
  const markets = Array.from({ length: opts.markets }, (_, i) => `m${i}`);
  const versions = new Uint32Array(opts.markets);
  const total = Math.round(opts.rate * opts.seconds);
  const intervalNs = 1e9 / opts.rate;

  let sent = 0;
  let maxLagNs = 0;
  const start = process.hrtime.bigint();

  // Catch-up pacer: update i is due at start + i/R. Each wake-up sends every
  // update that is due by now (so timer jitter never lowers the average
  // rate), then sleeps until the next one is due.
  while (sent < total) {
    const elapsedNs = Number(process.hrtime.bigint() - start);
    let due = Math.min(total, Math.floor(elapsedNs / intervalNs) + 1);
    if (due > sent) {
      const lag = elapsedNs - sent * intervalNs;
      if (lag > maxLagNs) maxLagNs = lag;
      // Bound a burst; the event loop gets a turn (to flush the Redis socket)
      // before the rest.
      if (due - sent > 10000) due = sent + 10000;
      for (; sent < due; sent++) {
        const m = sent % opts.markets;
        const version = ++versions[m];
        const us = nowUs();
        const ms = Math.floor(us / 1000);
        const msg =
          `{"type":"update","market":"${markets[m]}","version":${version},"ts":${ms},` +
          `"payload":{"sent_us":${us},"home":1.95,"draw":3.4,"away":4.2}}`;
        io.to(rooms[sent % opts.rooms]).emit("update", msg);
      }
      if (sent >= total) break;
    }
    const nextNs = sent * intervalNs - Number(process.hrtime.bigint() - start);
    const waitMs = nextNs / 1e6;
    if (waitMs >= 1.5) {
      // setTimeout oversleeps by up to ~1 ms; wake early and catch up.
      await sleep(Math.floor(waitMs - 0.5));
    } else {
      await new Promise((r) => setImmediate(r));
    }
  }
  const elapsed = Number(process.hrtime.bigint() - start) / 1e9;

  // QUIT is queued behind every PUBLISH, so its reply means all were sent.
  await client.quit();
  process.stdout.write(
    JSON.stringify({
      sent,
      seconds: opts.seconds,
      elapsed: Math.round(elapsed * 1e6) / 1e6,
      max_lag_ms: Math.round(maxLagNs / 1e3) / 1e3,
    }) + "\n");
}

main().catch((err) => {
  process.stderr.write(`emitter.js: ${err && err.stack ? err.stack : err}\n`);
  process.exit(1);
});

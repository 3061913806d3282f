#!/usr/bin/env node
// Socket.IO 4.8 + @socket.io/redis-adapter 8.3 peer baseline for the streampipe
// fan-out benchmark.
//
//   node server.js [--port 3000] [--redis redis://127.0.0.1:36379]
//
// Listens on 127.0.0.1:PORT, WebSocket transport only. A client connects to
//   ws://127.0.0.1:PORT/socket.io/?EIO=4&transport=websocket&room=ch42
// and, once it joins the default namespace (sends "40"), its socket joins the
// room named by the handshake query `room`. Updates are published to rooms
// through Redis by emitter.js (@socket.io/redis-emitter) and delivered here
// by the Redis adapter. Prints "ready" on stdout once listening.
"use strict";

const http = require("node:http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");

function parseArgs(argv) {
  const opts = { port: 3000, redis: "redis://127.0.0.1:36379" };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const eq = a.indexOf("=");
    const key = eq > 0 ? a.slice(0, eq) : a;
    const val = () => (eq > 0 ? a.slice(eq + 1) : argv[++i]);
    switch (key) {
      case "--port": opts.port = Number(val()); break;
      case "--redis": opts.redis = val(); break;
      case "-h":
      case "--help":
        process.stdout.write("usage: node server.js [--port P] [--redis URL]\n");
        process.exit(0);
      default:
        process.stderr.write(`server.js: unknown argument ${a}\n`);
        process.exit(2);
    }
  }
  if (!Number.isInteger(opts.port) || opts.port < 0 || opts.port > 65535) {
    process.stderr.write("server.js: --port must be an integer in 0..65535\n");
    process.exit(2);
  }
  return opts;
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));

  // As in the adapter's README: node-redis v4, one client for PUBLISH and a
  // duplicate for (P)SUBSCRIBE.
  const pubClient = createClient({ url: opts.redis });
  const subClient = pubClient.duplicate();
  for (const c of [pubClient, subClient]) {
    c.on("error", (err) => process.stderr.write(`server.js: redis: ${err.message}\n`));
  }
  await Promise.all([pubClient.connect(), subClient.connect()]);

  const httpServer = http.createServer((req, res) => {
    res.writeHead(404);
    res.end();
  });

  const io = new Server(httpServer, {
    adapter: createAdapter(pubClient, subClient),
    transports: ["websocket"],
    serveClient: false,
    perMessageDeflate: false,
    httpCompression: false,
    pingInterval: 25000,
    pingTimeout: 20000,
  });

  io.on("connection", (socket) => {
    let room = socket.handshake.query.room;
    if (Array.isArray(room)) room = room[0];
    if (typeof room === "string" && room.length > 0) socket.join(room);
  });

  await new Promise((resolve, reject) => {
    httpServer.once("error", reject);
    httpServer.listen(opts.port, "127.0.0.1", resolve);
  });
  process.stdout.write("ready\n");

  let closing = false;
  const shutdown = () => {
    if (closing) return;
    closing = true;
    // Don't let a slow close (many sockets, unreachable Redis) hang the bench.
    setTimeout(() => process.exit(0), 3000).unref();
    io.close(() => {
      Promise.allSettled([pubClient.quit(), subClient.quit()]).then(() => process.exit(0));
    });
  };
  process.on("SIGTERM", shutdown);
  process.on("SIGINT", shutdown);
}

main().catch((err) => {
  process.stderr.write(`server.js: ${err && err.stack ? err.stack : err}\n`);
  process.exit(1);
});

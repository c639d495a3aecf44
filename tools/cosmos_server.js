#!/usr/bin/env node
// Local Cosmos DB-compatible server (@vercel/cosmosdb-server) for tests and the local run.
//
// Why not the package's own CLI: it answers every request with `Connection: close`, which makes the
// Python SDK open a new TLS connection per request (~46 requests/s). With keepAlive the same
// server does ~860 upserts/s.
//
// Usage: node tools/cosmos_server.js [--port PORT] [--host HOST]
//        (or COSMOS_SERVER_PORT / COSMOS_SERVER_HOST; port 0 picks a free one)
// Prints one line `cosmosdb-server ready https://HOST:PORT/` once it accepts connections.
// Data lives in memory only. Stops cleanly on SIGTERM/SIGINT.
"use strict";

const { createHttpsServer } = require("@vercel/cosmosdb-server");

function parseArgs(argv) {
  const args = {
    port: process.env.COSMOS_SERVER_PORT || "0",
    host: process.env.COSMOS_SERVER_HOST || "127.0.0.1",
  };
  for (let i = 0; i < argv.length; i += 1) {
    const arg = argv[i];
    if (arg === "--port" || arg === "-p") {
      args.port = argv[++i];
    } else if (arg === "--host") {
      args.host = argv[++i];
    } else if (/^\d+$/.test(arg)) {
      args.port = arg;
    } else {
      console.error(`cosmos_server.js: unknown argument ${JSON.stringify(arg)}`);
      console.error("usage: node tools/cosmos_server.js [--port PORT] [--host HOST]");
      process.exit(2);
    }
  }
  const port = Number(args.port);
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    console.error(`cosmos_server.js: port must be an integer 0-65535, got ${JSON.stringify(args.port)}`);
    process.exit(2);
  }
  return { port, host: args.host };
}

const { port, host } = parseArgs(process.argv.slice(2));
const sockets = new Set();
const server = createHttpsServer({ keepAlive: true });

server.on("connection", (socket) => {
  sockets.add(socket);
  socket.on("close", () => sockets.delete(socket));
});
server.on("error", (err) => {
  console.error(`cosmos_server.js: ${err.message}`);
  process.exit(1);
});
server.listen(port, host, () => {
  const address = server.address();
  console.log(`cosmosdb-server ready https://${host}:${address.port}/`);
});

let stopping = false;
function stop(signal) {
  if (stopping) return;
  stopping = true;
  console.log(`cosmosdb-server stopping (${signal})`);
  // Keep-alive connections would hold close() open: end them.
  server.close(() => process.exit(0));
  for (const socket of sockets) socket.destroy();
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on("SIGTERM", () => stop("SIGTERM"));
process.on("SIGINT", () => stop("SIGINT"));

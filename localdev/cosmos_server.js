#!/usr/bin/env node
// Local Cosmos DB-compatible server (@vercel/cosmosdb-server) for tests and the local run.
//
// Why not the package's own CLI: it answers every request with `Connection: close`, which makes the
// Python SDK open a new TLS connection per request (~46 requests/s). With keepAlive the same
// server does ~860 upserts/s.
//
// Usage: node localdev/cosmos_server.js [--port PORT] [--host HOST]
//        (or COSMOS_SERVER_PORT / COSMOS_SERVER_HOST; port 0 picks a free one)
// Prints one line `cosmosdb-server ready https://HOST:PORT/` once it accepts connections.
// Data lives in memory only. Stops cleanly on SIGTERM/SIGINT.
"use strict";

// A point read of a missing document makes @vercel/cosmosdb-server 1.0.1 throw (HTTP 500); real
// Cosmos answers 404 NotFound, and the app's point reads depend on that. Answer 404 first. Patched
// before the package loads its routes, which capture the handler once.
const readDocument = require("@vercel/cosmosdb-server/lib/handler/read-document");
const { parsePartitionKey } = require("@vercel/cosmosdb-server/lib/utils/get-partition-from-header");
const readDocumentAsIs = readDocument.default;
readDocument.default = (account, req, res, params) => {
  const collection = account.database(params.dbId).collection(params.collId);
  if (collection.read()) {
    let document;
    try {
      const header = req.headers["x-ms-documentdb-partitionkey"];
      const partitionKey = parsePartitionKey(Array.isArray(header) ? header[0] : header, params.docId);
      document = collection.document(params.docId, partitionKey).read();
    } catch (error) {
      document = true; // a malformed partition key: let the package answer as it does
    }
    if (!document) {
      res.statusCode = 404;
      return { code: "NotFound", message: "Entity with the specified id does not exist in the system." };
    }
  }
  return readDocumentAsIs(account, req, res, params);
};

// The package runs every query over the whole container, ignoring the request's partition key; real
// Cosmos runs a single-partition query over that partition only. Scope it the same way: results
// match real Cosmos, and a point lookup by id + partition key no longer costs a full scan.
const { AsyncLocalStorage } = require("async_hooks");
const queryDocuments = require("@vercel/cosmosdb-server/lib/handler/query-documents");
const Items = require("@vercel/cosmosdb-server/lib/account/items").default;
const getValue = require("@vercel/cosmosdb-server/lib/utils/get-value").default;
const queryPartition = new AsyncLocalStorage();
const queryDocumentsAsIs = queryDocuments.default;
queryDocuments.default = (account, req, res, params) => {
  const crossPartition = String(req.headers["x-ms-documentdb-query-enablecrosspartition"]).toLowerCase() === "true";
  const header = req.headers["x-ms-documentdb-partitionkey"];
  let scope;
  if (!crossPartition && header && header !== "[{}]") {
    try {
      const parsed = JSON.parse(Array.isArray(header) ? header[0] : header);
      scope = Array.isArray(parsed) && parsed.length === 1 ? { value: parsed[0] } : undefined;
    } catch (error) {
      scope = undefined; // malformed: the package answers as it does
    }
  }
  return queryPartition.run(scope, () => queryDocumentsAsIs(account, req, res, params));
};
const queryAsIs = Items.prototype.query;
Items.prototype.query = function query(params, options) {
  const scope = queryPartition.getStore();
  if (!scope || !this._parent.read()) return queryAsIs.call(this, params, options);
  const all = this._data;
  const path = this._getPartitionKeyPath();
  const inPartition = new Map();
  for (const [rid, item] of all) {
    if (getValue(path, item.read()) === scope.value) inPartition.set(rid, item);
  }
  this._data = inPartition; // query() reads this._data synchronously: restored before anything else runs
  try {
    return queryAsIs.call(this, params, options);
  } finally {
    this._data = all;
  }
};

// The package parses a query's text again on every request (to check its partition key filter);
// parsing costs milliseconds. Parsed queries are immutable: keep them by text.
const cosmosdbQuery = require("@zeit/cosmosdb-query");
const parseQuery = cosmosdbQuery.default;
const parsedQueries = new Map();
cosmosdbQuery.default = (text) => {
  let parsed = parsedQueries.get(text);
  if (!parsed) {
    parsed = parseQuery(text);
    if (parsedQueries.size >= 1000) parsedQueries.clear();
    parsedQueries.set(text, parsed);
  }
  return parsed;
};

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
      console.error("usage: node localdev/cosmos_server.js [--port PORT] [--host HOST]");
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

// Faults on request, for the tests' failure enumeration: `POST /_faults` with
// {"method": "POST", "path": "<regex>", "partitionKey": "<regex>", "status": 500, "times": N, "skip": K}
// lets K matching requests pass, then makes the next N (times -1: all) fail with that status before
// the package sees them;
// with {"action": "kill", "pid": P, "when": "before" | "after"} it SIGKILLs process P (the app) instead:
// before the request takes effect, or after it took effect but before the answer is sent.
// `DELETE /_faults` removes every rule. Nothing outside the tests calls these paths.
const faults = [];
function matchingFault(req) {
  const partitionKey = String(req.headers["x-ms-documentdb-partitionkey"] || "");
  const index = faults.findIndex(
    (rule) =>
      (!rule.method || rule.method === req.method) &&
      (!rule.path || new RegExp(rule.path).test(decodeURIComponent(req.url))) &&
      (!rule.partitionKey || new RegExp(rule.partitionKey).test(partitionKey))
  );
  if (index < 0) return undefined;
  const rule = faults[index];
  if (rule.skip > 0) {
    rule.skip -= 1; // this one passes: the rule is for a later matching request
    return undefined;
  }
  if (rule.times > 0 && --rule.times === 0) faults.splice(index, 1);
  rule.hits = (rule.hits || 0) + 1;
  return rule;
}
function faultAdmin(req, res) {
  const answer = (status, body) => {
    res.writeHead(status, { "Content-Type": "application/json" });
    res.end(JSON.stringify(body));
  };
  if (req.method === "DELETE") {
    faults.length = 0;
    return answer(200, { faults: 0 });
  }
  if (req.method === "GET") return answer(200, faults);
  let text = "";
  req.on("data", (chunk) => (text += chunk));
  req.on("end", () => {
    try {
      const rule = JSON.parse(text);
      faults.push({ status: 500, times: 1, ...rule });
      answer(201, { faults: faults.length });
    } catch (error) {
      answer(400, { message: String(error) });
    }
  });
}

const { port, host } = parseArgs(process.argv.slice(2));
const sockets = new Set();
const server = createHttpsServer({ keepAlive: true });
const emitAsIs = server.emit.bind(server);
server.emit = (event, req, res) => {
  if (event !== "request") return emitAsIs(event, req, res);
  if (req.url === "/_faults") return faultAdmin(req, res) || true;
  const rule = matchingFault(req);
  if (!rule) return emitAsIs(event, req, res);
  if (rule.action === "kill") {
    const kill = () => {
      try {
        process.kill(rule.pid, "SIGKILL");
      } catch (error) {
        // already gone
      }
    };
    if (rule.when === "after") {
      const endAsIs = res.end.bind(res);
      res.end = (...args) => {
        kill();
        return endAsIs(...args);
      };
      return emitAsIs(event, req, res);
    }
    kill();
    req.resume();
    res.destroy();
    return true;
  }
  req.resume();
  res.writeHead(rule.status, { "Content-Type": "application/json", "x-ms-activity-id": "fault" });
  res.end(JSON.stringify({ code: "InjectedFault", message: `fault injected by the test (HTTP ${rule.status})` }));
  return true;
};

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

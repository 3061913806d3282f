'use strict';
// Unit tests for streampipe.js: node --test publisher/static/test/
// Fake WebSocket / EventSource / fetch / timers; no network, no packages.

const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const vm = require('node:vm');

const LIB = path.join(__dirname, '..', 'streampipe.js');
const StreamPipe = require(LIB);

const BASE = 'http://pub.test:8080';
const M1 = 'football.epl.1000:match_odds';
const M2 = 'football.epl.1001:match_odds';

// ---- fakes ----------------------------------------------------------------

function makeWebSocket() {
  const sockets = [];
  class FakeWebSocket {
    constructor(url, protocols) {
      this.url = url;
      this.protocols = protocols;
      this.sent = [];
      this.closedWith = null;
      this.readyState = 0;
      sockets.push(this);
    }
    send(data) {
      if (this.readyState === 3) throw new Error('socket closed');
      this.sent.push(JSON.parse(data));
      this.rawSent = (this.rawSent || []).concat([data]);
    }
    close(code, reason) {
      this.closedWith = { code, reason };
      this.readyState = 3;
    }
    // server side
    open() {
      this.readyState = 1;
      if (this.onopen) this.onopen({});
    }
    frame(obj) {
      this.onmessage({ data: JSON.stringify(obj) });
    }
    subscribed(channel, markets) {
      this.open();
      this.frame({ type: 'subscribed', channel, markets });
    }
    serverClose(code, reason = '') {
      this.readyState = 3;
      this.onclose({ code, reason, wasClean: code !== 1006 });
    }
  }
  return { FakeWebSocket, sockets };
}

function makeEventSource() {
  const sources = [];
  class FakeEventSource {
    constructor(url) {
      this.url = url;
      this.listeners = {};
      this.closed = false;
      sources.push(this);
    }
    addEventListener(type, fn) {
      (this.listeners[type] = this.listeners[type] || []).push(fn);
    }
    close() {
      this.closed = true;
    }
    emit(type, obj) {
      const ev = { type, data: JSON.stringify(obj) };
      for (const fn of this.listeners[type] || []) fn(ev);
    }
    fail() {
      this.onerror({});
    }
  }
  return { FakeEventSource, sources };
}

function response(status, body) {
  return {
    status,
    ok: status >= 200 && status < 300,
    text: async () => (body === undefined ? '' : JSON.stringify(body)),
  };
}

// routes: array of [method, regex, handler(call) -> response]; first match
// answering a response wins; the defaults come last.
function makeFetch(routes = []) {
  const calls = [];
  let n = 0;
  const defaults = [
    ['POST', /\/v1\/channels$/, (c) => response(201, { channel: 'ch-' + ++n, markets: c.body.markets })],
    ['POST', /\/v1\/channels\/[^/]+\/markets$/, (c) => response(200, { channel: 'x', markets: [M1, M2, ...c.body.markets] })],
    ['DELETE', /\/v1\/channels\/[^/]+\/markets\/.+$/, () => response(204)],
    ['POST', /\/v1\/channels\/[^/]+\/begin$/, () => response(202)],
    ['DELETE', /\/v1\/channels\/[^/]+$/, () => response(204)],
  ];
  async function fakeFetch(url, init = {}) {
    const call = { url, method: init.method || 'GET', body: init.body ? JSON.parse(init.body) : undefined, init };
    calls.push(call);
    for (const [method, re, handler] of routes.concat(defaults)) {
      if (method === call.method && re.test(new URL(url).pathname)) {
        const r = await handler(call);
        if (r) return r; // a falsy answer falls through to the next route
      }
    }
    return response(404, { error: { code: 'not_found', message: 'no route' } });
  }
  return { fetch: fakeFetch, calls };
}

// Fake timers: records delays, runs callbacks on demand.
function makeTimers() {
  const pending = new Map();
  const delays = [];
  let id = 0;
  return {
    delays,
    pending,
    setTimeout(fn, ms) {
      pending.set(++id, { fn, ms });
      delays.push(ms);
      return id;
    },
    clearTimeout(t) {
      pending.delete(t);
    },
    runAll() {
      const list = [...pending.entries()];
      pending.clear();
      for (const [, t] of list) t.fn();
    },
  };
}

async function waitFor(pred, what = 'condition', ms = 500) {
  const end = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > end) throw new Error('timed out waiting for ' + what);
    await new Promise((r) => setImmediate(r));
  }
}

const tick = () => new Promise((r) => setImmediate(r));

function setup(opts = {}, routes) {
  const { FakeWebSocket, sockets } = makeWebSocket();
  const { FakeEventSource, sources } = makeEventSource();
  const f = makeFetch(routes);
  const timers = opts.timers || makeTimers();
  const client = new StreamPipe(
    Object.assign(
      {
        baseUrl: BASE,
        markets: [M1, M2],
        WebSocket: FakeWebSocket,
        EventSource: FakeEventSource,
        fetch: f.fetch,
        setTimeout: timers.setTimeout,
        clearTimeout: timers.clearTimeout,
        random: () => 0,
        beginMinIntervalMs: 0, // throttling has its own test
      },
      opts.client || {},
    ),
  );
  const events = { update: [], state: [], error: [], reset: [], channel: [], duplicate: [] };
  for (const k of Object.keys(events)) client.on(k, (x) => events[k].push(x));
  return { client, sockets, sources, calls: f.calls, timers, events };
}

function upd(market, version, payload = { home: 1.9, draw: 3.4, away: 4.2 }, ts = Date.now()) {
  return { type: 'update', market, version, ts, payload };
}

// Connects a started client's first socket to the subscribed state.
async function connected(env, channel = 'ch-1') {
  await waitFor(() => env.sockets.length === 1, 'first socket');
  env.sockets[0].subscribed(channel, [M1, M2]);
  return env.sockets[0];
}

// ---- tests ----------------------------------------------------------------

test('start() creates a channel, then connects the WebSocket to it', async () => {
  const env = setup();
  assert.equal(env.client.connectionState, 'idle');
  env.client.start();
  assert.equal(env.client.connectionState, 'connecting');
  await waitFor(() => env.sockets.length === 1, 'socket');
  assert.equal(env.calls.length, 1);
  assert.equal(env.calls[0].method, 'POST');
  assert.equal(env.calls[0].url, BASE + '/v1/channels');
  assert.deepEqual(env.calls[0].body, { markets: [M1, M2] });
  assert.equal(env.calls[0].init.headers['content-type'], 'application/json');
  assert.equal(env.sockets[0].url, 'ws://pub.test:8080/v1/stream/ch-1');
  assert.equal(env.client.channel, 'ch-1');
  assert.deepEqual(env.events.channel, ['ch-1']);
  await env.client.close({ deleteChannel: false });
});

test('https base gives wss; a given channel is used without POST', async () => {
  const env = setup({ client: { baseUrl: 'https://odds.test/edge/', channel: 'given-1' } });
  env.client.start();
  await waitFor(() => env.sockets.length === 1, 'socket');
  assert.equal(env.sockets[0].url, 'wss://odds.test/edge/v1/stream/given-1');
  assert.equal(env.calls.length, 0);
  await env.client.close({ deleteChannel: false });
});

test('begin is sent only after `subscribed`, without since when no version is known', async () => {
  const env = setup();
  env.client.start();
  await waitFor(() => env.sockets.length === 1, 'socket');
  const ws = env.sockets[0];
  ws.open();
  await tick();
  assert.deepEqual(ws.sent, [], 'nothing sent before subscribed');
  ws.frame({ type: 'subscribed', channel: 'ch-1', markets: [M1, M2] });
  assert.deepEqual(ws.sent, [{ type: 'begin' }]);
  assert.equal(env.client.connectionState, 'subscribed');
  ws.frame(upd(M1, 3));
  assert.equal(env.client.connectionState, 'live');
  assert.deepEqual(env.events.state, ['connecting', 'subscribed', 'live']);
  await env.client.close({ deleteChannel: false });
});

test('begin carries since with the known versions', async () => {
  const env = setup({ client: { channel: 'c', versions: { [M1]: 7, [M2]: 2 } } });
  env.client.start();
  await waitFor(() => env.sockets.length === 1, 'socket');
  env.sockets[0].subscribed('c', [M1, M2]);
  assert.deepEqual(env.sockets[0].sent, [{ type: 'begin', since: { [M1]: 7, [M2]: 2 } }]);
  await env.client.close({ deleteChannel: false });
});

test('fromMs rides in every begin frame next to since', async () => {
  const env = setup({ client: { channel: 'c', versions: { [M1]: 7 }, fromMs: 1700000000000 } });
  env.client.start();
  await waitFor(() => env.sockets.length === 1, 'socket');
  env.sockets[0].subscribed('c', [M1, M2]);
  assert.deepEqual(env.sockets[0].sent, [{ type: 'begin', since: { [M1]: 7 }, from_ms: 1700000000000 }]);
  await env.client.close({ deleteChannel: false });
  const bad = setup({ client: { channel: 'c', fromMs: -5 } });
  assert.equal(bad.client.fromMs, null, 'a negative time is ignored');
});

test('since is trimmed so the begin frame stays within 4 KiB; the overflow goes in the URL', async () => {
  const versions = {};
  for (let i = 0; i < 300; i++) versions['football.league.' + (100000 + i) + ':match_odds'] = 1000000 + i;
  const env = setup({ client: { channel: 'c', versions } });
  env.client.start();
  await waitFor(() => env.sockets.length === 1, 'socket');
  env.sockets[0].subscribed('c', []);
  const raw = env.sockets[0].rawSent[0];
  assert.ok(Buffer.byteLength(raw) <= 4096, 'frame is ' + Buffer.byteLength(raw) + ' bytes');
  const since = JSON.parse(raw).since;
  const n = Object.keys(since).length;
  assert.ok(n > 50 && n < 300, 'kept ' + n + ' entries');
  for (const [m, v] of Object.entries(since)) assert.equal(v, versions[m]);
  // the URL carries other entries, as market@version
  const url = new URL(env.sockets[0].url);
  assert.equal(url.pathname, '/v1/stream/c');
  const q = url.searchParams.get('since');
  assert.ok(q.length <= 4096, 'query since is ' + q.length + ' chars');
  const inUrl = q.split(',').map((e) => e.split('@'));
  assert.ok(inUrl.length > 50, 'url carries ' + inUrl.length + ' entries');
  for (const [m, v] of inUrl) {
    assert.equal(Number(v), versions[m]);
    assert.ok(!(m in since), m + ' is in both');
  }
  await env.client.close({ deleteChannel: false });
});

test('a small since goes only in the begin frame, not in the URL', async () => {
  const env = setup({ client: { channel: 'c', versions: { [M1]: 1 } } });
  env.client.start();
  await waitFor(() => env.sockets.length === 1, 'socket');
  assert.equal(env.sockets[0].url, 'ws://pub.test:8080/v1/stream/c');
  await env.client.close({ deleteChannel: false });
});

test('begins closer than beginMinIntervalMs are deferred and merged', async () => {
  let now = 1_000_000;
  const env = setup({ client: { beginMinIntervalMs: 600, now: () => now } });
  env.client.start();
  const ws = await connected(env);
  assert.equal(ws.sent.length, 1, 'first begin at once');
  ws.frame(upd(M1, 4));
  now += 100;
  ws.frame({ type: 'reset', reason: 'x' });
  await env.client.addMarkets(['tennis.atp.7:match_winner']);
  assert.equal(ws.sent.length, 1, 'second begin deferred');
  assert.deepEqual(env.timers.delays, [500]);
  assert.equal(env.timers.pending.size, 1, 'the two requests share one timer');
  now += 500;
  env.timers.runAll();
  assert.deepEqual(ws.sent, [{ type: 'begin' }, { type: 'begin', since: { [M1]: 4 } }]);
  now += 1000;
  ws.frame({ type: 'reset', reason: 'y' });
  assert.equal(ws.sent.length, 3, 'after the interval a begin goes at once');
  // a new connection starts a fresh interval
  ws.serverClose(1006);
  env.timers.runAll();
  await waitFor(() => env.sockets.length === 2, 'second socket');
  env.sockets[1].subscribed('ch-1', [M1]);
  assert.equal(env.sockets[1].sent.length, 1);
  await env.client.close({ deleteChannel: false });
});

test('invalid initial versions and malformed updates are ignored', async () => {
  const env = setup({ client: { channel: 'c', versions: { [M1]: 1.5, 'bad id': 3, [M2]: 0, 'ok.1': 9 } } });
  assert.deepEqual({ ...env.client.versions }, { 'ok.1': 9 });
  env.client.start();
  await waitFor(() => env.sockets.length === 1, 'socket');
  const ws = env.sockets[0];
  ws.subscribed('c', [M1]);
  ws.frame(upd(M1, 2.5));
  ws.onmessage({ data: 'not json' });
  ws.frame({ type: 'update', version: 3 });
  ws.frame({ type: 'something_new' });
  assert.equal(env.events.update.length, 0);
  assert.equal(env.events.error.length, 3);
  assert.ok(env.events.error.every((e) => e.code === 'bad_frame' && !e.fatal));
  assert.equal(env.client.connectionState, 'subscribed');
  await env.client.close({ deleteChannel: false });
});

test('updates whose version is not newer are dropped and counted', async () => {
  const env = setup({ client: { now: () => 5000 } });
  env.client.start();
  const ws = await connected(env);
  ws.frame(upd(M1, 5, { home: 2 }, 4000));
  ws.frame(upd(M1, 5, { home: 3 }));
  ws.frame(upd(M1, 4, { home: 4 }));
  ws.frame(upd(M2, 1, { home: 5 }, 4990));
  ws.frame(upd(M1, 6, { home: 6 }, 4900));
  ws.frame(upd(M2, 1, { home: 7 }));
  assert.deepEqual(
    env.events.update.map((u) => [u.market, u.version, u.payload.home]),
    [[M1, 5, 2], [M2, 1, 5], [M1, 6, 6]],
  );
  assert.equal(env.client.stats.updates, 3);
  assert.equal(env.client.stats.duplicates, 3);
  assert.equal(env.events.duplicate.length, 3);
  assert.equal(env.client.versions[M1], 6);
  assert.equal(env.client.versions[M2], 1);
  assert.equal(env.client.state[M1].payload.home, 6);
  assert.equal(env.client.state[M2].payload.home, 5);
  assert.equal(env.client.stats.lastLatencyMs, 100);
  await env.client.close({ deleteChannel: false });
});

test('after a 1006 close it reconnects with backoff and begin carries since', async () => {
  const env = setup();
  env.client.start();
  const ws = await connected(env);
  ws.frame(upd(M1, 10));
  ws.frame(upd(M2, 4));
  ws.serverClose(1006);
  assert.equal(env.client.connectionState, 'reconnecting');
  assert.equal(env.client.stats.reconnects, 1);
  assert.equal(env.timers.pending.size, 1);
  assert.deepEqual(env.timers.delays, [250], 'first delay is backoff.min (random() = 0)');
  await tick();
  assert.equal(env.sockets.length, 1, 'no new socket before the backoff delay');
  env.timers.runAll();
  await waitFor(() => env.sockets.length === 2, 'second socket');
  const ws2 = env.sockets[1];
  assert.equal(ws2.url, 'ws://pub.test:8080/v1/stream/ch-1', 'same channel');
  assert.equal(env.calls.filter((c) => c.method === 'POST').length, 1, 'no new channel');
  assert.equal(env.client.connectionState, 'reconnecting');
  ws2.subscribed('ch-1', [M1, M2]);
  assert.deepEqual(ws2.sent, [{ type: 'begin', since: { [M1]: 10, [M2]: 4 } }]);
  ws2.frame(upd(M1, 10));
  ws2.frame(upd(M1, 11));
  assert.equal(env.client.stats.duplicates, 1);
  assert.deepEqual(env.events.update.map((u) => u.version), [10, 4, 11]);
  assert.equal(env.client.connectionState, 'live');
  await env.client.close({ deleteChannel: false });
});

test('backoff grows exponentially, is capped, jittered, and resets after subscribed', async () => {
  let r = 0;
  const env = setup({ client: { backoff: { min: 100, max: 1000 }, random: () => r } });
  env.client.start();
  await connected(env);
  for (let i = 0; i < 6; i++) {
    env.sockets[env.sockets.length - 1].serverClose(1006);
    env.timers.runAll();
    await waitFor(() => env.sockets.length === i + 2, 'socket ' + (i + 2));
  }
  assert.deepEqual(env.timers.delays, [100, 200, 400, 800, 1000, 1000]);
  assert.equal(env.client.stats.reconnects, 6);
  // jitter: random() = 1 halves the delay (jitter 0.5); subscribed resets the attempt counter
  env.sockets[env.sockets.length - 1].subscribed('ch-1', [M1, M2]);
  r = 1;
  env.sockets[env.sockets.length - 1].serverClose(1006);
  assert.equal(env.timers.delays[6], 50);
  await env.client.close({ deleteChannel: false });
});

for (const code of [1001, 1011, 4408, 4409, 1012]) {
  test('close code ' + code + ' reconnects to the same channel with since', async () => {
    const env = setup();
    env.client.start();
    const ws = await connected(env);
    ws.frame(upd(M1, 3));
    ws.serverClose(code);
    assert.equal(env.client.connectionState, 'reconnecting');
    env.timers.runAll();
    await waitFor(() => env.sockets.length === 2, 'second socket');
    assert.equal(env.sockets[1].url, 'ws://pub.test:8080/v1/stream/ch-1');
    env.sockets[1].subscribed('ch-1', [M1, M2]);
    assert.deepEqual(env.sockets[1].sent, [{ type: 'begin', since: { [M1]: 3 } }]);
    await env.client.close({ deleteChannel: false });
  });
}

test('4404 creates a new channel at once and connects to it', async () => {
  const env = setup();
  env.client.start();
  const ws = await connected(env);
  ws.frame(upd(M1, 8));
  ws.serverClose(4404, 'unknown channel');
  assert.equal(env.timers.delays[0], 0, 'first retry after 4404 is immediate');
  env.timers.runAll();
  await waitFor(() => env.sockets.length === 2, 'second socket');
  const posts = env.calls.filter((c) => c.method === 'POST' && c.url === BASE + '/v1/channels');
  assert.equal(posts.length, 2);
  assert.deepEqual(posts[1].body, { markets: [M1, M2] });
  assert.equal(env.client.channel, 'ch-2');
  assert.equal(env.sockets[1].url, 'ws://pub.test:8080/v1/stream/ch-2');
  assert.deepEqual(env.events.channel, ['ch-1', 'ch-2']);
  env.sockets[1].subscribed('ch-2', [M1, M2]);
  assert.deepEqual(env.sockets[1].sent, [{ type: 'begin', since: { [M1]: 8 } }]);
  // A second 4404 in a row backs off instead of spinning.
  env.sockets[1].serverClose(1006);
  env.timers.runAll();
  await waitFor(() => env.sockets.length === 3, 'third socket');
  env.sockets[2].serverClose(4404);
  assert.ok(env.timers.delays[env.timers.delays.length - 1] > 0);
  await env.client.close({ deleteChannel: false });
});

for (const code of [4410, 1000]) {
  test('close code ' + code + ' stops the client', async () => {
    const env = setup();
    env.client.start();
    const ws = await connected(env);
    ws.serverClose(code);
    assert.equal(env.client.connectionState, 'closed');
    assert.equal(env.timers.pending.size, 0, 'no reconnect scheduled');
    await tick();
    await tick();
    assert.equal(env.sockets.length, 1);
    assert.equal(env.client.stats.reconnects, 0);
    assert.deepEqual(env.client.lastClose, { code, reason: '' });
    assert.equal(env.events.error.length, 0);
    await env.client.close();
    const deletes = env.calls.filter((c) => c.method === 'DELETE');
    assert.equal(deletes.length, code === 4410 ? 0 : 1, 'a channel closed through the API is not deleted again');
  });
}

test('4400 / 4403 stop with a fatal error', async () => {
  for (const code of [4400, 4403]) {
    const env = setup();
    env.client.start();
    const ws = await connected(env);
    ws.serverClose(code);
    assert.equal(env.client.connectionState, 'closed');
    assert.equal(env.timers.pending.size, 0);
    assert.equal(env.events.error.length, 1);
    assert.equal(env.events.error[0].fatal, true);
    assert.equal(env.events.error[0].closeCode, code);
  }
});

test('reset sends begin again with since', async () => {
  const env = setup();
  env.client.start();
  const ws = await connected(env);
  ws.frame(upd(M1, 2));
  ws.frame(upd(M2, 9));
  ws.frame({ type: 'reset', reason: 'redis_resubscribed' });
  assert.equal(env.events.reset.length, 1);
  assert.deepEqual(ws.sent, [{ type: 'begin' }, { type: 'begin', since: { [M1]: 2, [M2]: 9 } }]);
  assert.equal(env.sockets.length, 1, 'no reconnect for reset');
  await env.client.close({ deleteChannel: false });
});

test('history: recovered frames are kept and emitted; the replayed events apply in order', async () => {
  const env = setup();
  const got = [];
  env.client.on('recovered', (m) => got.push(m));
  env.client.start();
  const ws = await connected(env);
  ws.frame(upd(M1, 3));
  ws.serverClose(1006);
  env.timers.runAll();
  await waitFor(() => env.sockets.length === 2, 'second socket');
  const ws2 = env.sockets[1];
  ws2.subscribed('ch-1', [M1]);
  assert.deepEqual(ws2.sent, [{ type: 'begin', since: { [M1]: 3 } }]);
  ws2.frame({ type: 'recovered', market: M1, since: 3, recovered: true, replayed: 3 });
  for (const v of [4, 5, 6]) ws2.frame(upd(M1, v));
  ws2.frame(upd(M1, 6)); // a live duplicate of the last replayed one
  assert.equal(got.length, 1);
  assert.equal(env.client.recovered[M1], true);
  assert.deepEqual(env.events.update.map((u) => u.version), [3, 4, 5, 6]);
  assert.equal(env.client.stats.duplicates, 1);
  ws2.frame({ type: 'recovered', market: M1, since: 6, recovered: false, replayed: 0 });
  assert.equal(env.client.recovered[M1], false);
  await env.client.close({ deleteChannel: false });
});

test('history: 4412 (history gap) reconnects at once and resumes with since', async () => {
  const env = setup();
  env.client.start();
  const ws = await connected(env);
  ws.frame(upd(M1, 8));
  ws.serverClose(4412, 'too far behind on a history market');
  assert.equal(env.client.connectionState, 'reconnecting');
  assert.equal(env.timers.delays[env.timers.delays.length - 1], 0, 'no backoff');
  env.timers.runAll();
  await waitFor(() => env.sockets.length === 2, 'second socket');
  env.sockets[1].subscribed('ch-1', [M1]);
  assert.deepEqual(env.sockets[1].sent, [{ type: 'begin', since: { [M1]: 8 } }]);
  assert.equal(env.events.error.length, 0);
  await env.client.close({ deleteChannel: false });
});

test('history over SSE: after a recovered frame, reset reconnects with since instead of a REST begin', async () => {
  const env = setup({ client: { transport: 'sse', channel: 'c' } });
  env.client.start();
  await waitFor(() => env.sources.length === 1, 'event source');
  env.sources[0].emit('subscribed', { type: 'subscribed', channel: 'c', markets: [M1] });
  env.sources[0].emit('recovered', { type: 'recovered', market: M1, since: 1, recovered: true, replayed: 0 });
  env.sources[0].emit('update', upd(M1, 7));
  env.sources[0].emit('reset', { type: 'reset', reason: 'x' });
  assert.equal(env.sources[0].closed, true);
  env.timers.runAll();
  await waitFor(() => env.sources.length === 2, 'second event source');
  assert.equal(env.sources[1].url, BASE + '/v1/sse/c?begin=1&since=' + M1 + '@7');
  assert.equal(env.calls.filter((c) => c.url.endsWith('/begin')).length, 0, 'no REST begin');
  await env.client.close({ deleteChannel: false });
});

test('close() deletes the channel, closes the socket and does not reconnect', async () => {
  const env = setup();
  env.client.start();
  const ws = await connected(env);
  await env.client.close();
  const del = env.calls.filter((c) => c.method === 'DELETE');
  assert.equal(del.length, 1);
  assert.equal(del[0].url, BASE + '/v1/channels/ch-1');
  assert.deepEqual(ws.closedWith, { code: 1000, reason: 'client closed' });
  assert.equal(env.client.connectionState, 'closed');
  ws.serverClose(1006); // late close event of the old socket
  await tick();
  assert.equal(env.timers.pending.size, 0);
  assert.equal(env.sockets.length, 1);
  assert.equal(env.client.stats.reconnects, 0);
});

test('close() while a reconnect is pending cancels it', async () => {
  const env = setup();
  env.client.start();
  const ws = await connected(env);
  ws.serverClose(1006);
  assert.equal(env.timers.pending.size, 1);
  await env.client.close({ deleteChannel: false });
  assert.equal(env.timers.pending.size, 0, 'retry timer cleared');
  assert.equal(env.client.connectionState, 'closed');
});

test('frames and close events of a replaced socket are ignored', async () => {
  const env = setup();
  env.client.start();
  const ws = await connected(env);
  ws.frame(upd(M1, 1));
  ws.serverClose(1006);
  env.timers.runAll();
  await waitFor(() => env.sockets.length === 2, 'second socket');
  env.sockets[1].subscribed('ch-1', [M1, M2]);
  ws.frame(upd(M1, 2)); // late frame on the dead socket
  ws.frame({ type: 'reset', reason: 'late' });
  ws.onclose({ code: 1006, reason: '' }); // duplicate close event
  assert.deepEqual(env.events.update.map((u) => u.version), [1]);
  assert.equal(env.events.reset.length, 0);
  assert.equal(env.client.stats.reconnects, 1);
  assert.equal(env.timers.pending.size, 0);
  assert.equal(env.client.connectionState, 'subscribed');
  await env.client.close({ deleteChannel: false });
});

test('close() during channel creation deletes the channel once it exists', async () => {
  let release;
  const gate = new Promise((r) => (release = r));
  const env = setup({}, [['POST', /\/v1\/channels$/, async () => (await gate, response(201, { channel: 'late-1', markets: [M1] }))]]);
  env.client.start();
  await tick();
  const closing = env.client.close();
  release();
  await closing;
  await tick();
  assert.equal(env.sockets.length, 0, 'no socket after close');
  assert.deepEqual(
    env.calls.filter((c) => c.method === 'DELETE').map((c) => c.url),
    [BASE + '/v1/channels/late-1'],
  );
});

test('channel creation: 503 is retried with backoff, 400 stops with a fatal error', async () => {
  let fail = 1;
  const env = setup({}, [
    ['POST', /\/v1\/channels$/, () => (fail-- > 0 ? response(503, { error: { code: 'unavailable', message: 'kafka' } }) : undefined)],
  ]);
  env.client.start();
  await waitFor(() => env.client.connectionState === 'reconnecting', 'reconnecting');
  assert.equal(env.events.error[0].code, 'unavailable');
  assert.equal(env.events.error[0].fatal, false);
  assert.equal(env.sockets.length, 0);
  env.timers.runAll();
  await waitFor(() => env.sockets.length === 1, 'socket after retry');
  assert.equal(env.sockets[0].url, 'ws://pub.test:8080/v1/stream/ch-1');
  await env.client.close({ deleteChannel: false });

  const env2 = setup({}, [
    ['POST', /\/v1\/channels$/, () => response(400, { error: { code: 'invalid_market', message: 'bad id' } })],
  ]);
  env2.client.start();
  await waitFor(() => env2.client.connectionState === 'closed', 'closed');
  assert.equal(env2.events.error.length, 1);
  assert.equal(env2.events.error[0].code, 'invalid_market');
  assert.equal(env2.events.error[0].status, 400);
  assert.equal(env2.events.error[0].fatal, true);
  assert.equal(env2.timers.pending.size, 0);
});

test('network errors while creating the channel are retried', async () => {
  let fail = true;
  const env = setup();
  const real = env.client._fetch;
  env.client._fetch = async (url, init) => {
    if (fail) {
      fail = false;
      throw new TypeError('Failed to fetch');
    }
    return real(url, init);
  };
  env.client.start();
  await waitFor(() => env.client.connectionState === 'reconnecting', 'reconnecting');
  assert.equal(env.events.error[0].code, 'network');
  env.timers.runAll();
  await waitFor(() => env.sockets.length === 1, 'socket');
  await env.client.close({ deleteChannel: false });
});

test('addMarkets posts the markets and asks for their state with begin', async () => {
  const env = setup();
  env.client.start();
  const ws = await connected(env);
  ws.frame(upd(M1, 4));
  const M3 = 'tennis.atp.7:match_winner';
  const markets = await env.client.addMarkets([M3]);
  const post = env.calls.find((c) => c.url === BASE + '/v1/channels/ch-1/markets');
  assert.ok(post, 'POST /v1/channels/ch-1/markets');
  assert.equal(post.method, 'POST');
  assert.deepEqual(post.body, { markets: [M3] });
  assert.deepEqual(markets, [M1, M2, M3]);
  assert.deepEqual(env.client.markets, [M1, M2, M3]);
  assert.deepEqual(ws.sent[ws.sent.length - 1], { type: 'begin', since: { [M1]: 4 } });
  await env.client.close({ deleteChannel: false });
});

test('addMarkets before start() joins the markets of the created channel', async () => {
  const env = setup();
  const M3 = 'tennis.atp.7:match_winner';
  await env.client.addMarkets([M3]);
  env.client.start();
  await waitFor(() => env.sockets.length === 1, 'socket');
  assert.deepEqual(env.calls[0].body, { markets: [M1, M2, M3] });
  await env.client.close({ deleteChannel: false });
});

test('removeMarket deletes it on the server and ignores its late updates', async () => {
  const env = setup();
  env.client.start();
  const ws = await connected(env);
  ws.frame(upd(M2, 4));
  await env.client.removeMarket(M2);
  const del = env.calls.find((c) => c.method === 'DELETE');
  assert.equal(del.url, BASE + '/v1/channels/ch-1/markets/' + M2);
  assert.deepEqual(env.client.markets, [M1]);
  assert.equal(env.client.versions[M2], undefined);
  assert.equal(env.client.state[M2], undefined);
  ws.frame(upd(M2, 5));
  assert.equal(env.events.update.length, 1, 'late update of a removed market ignored');
  ws.frame({ type: 'reset', reason: 'x' });
  assert.deepEqual(ws.sent[ws.sent.length - 1], { type: 'begin' }, 'since no longer names the removed market');
  await env.client.close({ deleteChannel: false });
});

const QUERY_ROUTES = [
  ['POST', /\/v1\/channels\/[^/]+\/queries$/, (c) => response(200, { channel: 'x', queries: [c.body.query.split(';').sort().join(';')] })],
  ['DELETE', /\/v1\/channels\/[^/]+\/queries$/, (c) =>
    new URL(c.url).searchParams.get('query') === 'gone=1'
      ? response(404, { error: { code: 'unknown_query', message: 'no' } })
      : response(204)],
];

test('queries: added to a created channel; their markets join at their first update and leave on `removed`', async () => {
  const env = setup({ client: { queries: ['status=open;market^=FB.'] } }, QUERY_ROUTES);
  const removed = [];
  env.client.on('removed', (m) => removed.push(m));
  env.client.start();
  const ws = await connected(env);
  const post = env.calls.find((c) => c.url === BASE + '/v1/channels/ch-1/queries');
  assert.ok(post, 'the query was added to the new channel');
  assert.deepEqual(post.body, { query: 'status=open;market^=FB.' });
  assert.deepEqual(env.client.queries, ['market^=FB.;status=open'], 'canonical from the server');
  ws.frame(upd('FB.new', 1));
  assert.deepEqual(env.client.markets, [M1, M2, 'FB.new']);
  assert.equal(env.client.versions['FB.new'], 1);
  ws.frame({ type: 'removed', market: 'FB.new' });
  assert.deepEqual(removed, [{ type: 'removed', market: 'FB.new' }]);
  assert.deepEqual(env.client.markets, [M1, M2]);
  assert.equal(env.client.versions['FB.new'], undefined);
  assert.equal(env.client.state['FB.new'], undefined);
  // It may match again later: its updates are applied again.
  ws.frame(upd('FB.new', 3));
  assert.equal(env.client.versions['FB.new'], 3);
  ws.frame({ type: 'reset', reason: 'x' });
  assert.deepEqual(ws.sent[ws.sent.length - 1], { type: 'begin', since: { 'FB.new': 3 } });
  await env.client.close({ deleteChannel: false });
});

test('addQuery / removeQuery call the API; removing an unknown query is no error', async () => {
  const env = setup({}, QUERY_ROUTES);
  await env.client.addQuery('market^=TN.');
  assert.deepEqual(env.client.queries, ['market^=TN.'], 'kept for the channel to come');
  assert.equal(env.calls.length, 0);
  env.client.start();
  await connected(env);
  const qs = await env.client.addQuery('sport=tennis');
  assert.deepEqual(qs, ['sport=tennis']);
  await env.client.removeQuery('market^=TN.');
  const del = env.calls.find((c) => c.method === 'DELETE');
  assert.equal(del.url, BASE + '/v1/channels/ch-1/queries?query=market%5ETN.'.replace('%5ETN', '%5E%3DTN'));
  await env.client.removeQuery('gone=1');
  await assert.rejects(env.client.addQuery(''), (e) => e.code === 'invalid_query');
  await env.client.close({ deleteChannel: false });
});

test('SSE: connects with begin=1 and since, dedupes, and reconnects with fresh since', async () => {
  const env = setup({ client: { transport: 'sse', channel: 'c-sse', versions: { [M1]: 3 } } });
  env.client.start();
  await waitFor(() => env.sources.length === 1, 'event source');
  const es = env.sources[0];
  assert.equal(es.url, BASE + '/v1/sse/c-sse?begin=1&since=' + M1 + '@3');
  es.emit('subscribed', { type: 'subscribed', channel: 'c-sse', markets: [M1, M2] });
  assert.equal(env.client.connectionState, 'subscribed');
  es.emit('update', upd(M1, 3));
  es.emit('update', upd(M1, 4));
  es.emit('update', upd(M2, 2));
  assert.deepEqual(env.events.update.map((u) => u.version), [4, 2]);
  assert.equal(env.client.stats.duplicates, 1);
  // reset: SSE cannot send frames, so begin goes through the control API
  es.emit('reset', { type: 'reset', reason: 'x' });
  await waitFor(() => env.calls.some((c) => c.url === BASE + '/v1/channels/c-sse/begin'), 'POST begin');
  // connection lost after subscribed: reconnect (own backoff, EventSource closed)
  es.fail();
  assert.equal(es.closed, true);
  assert.equal(env.client.connectionState, 'reconnecting');
  env.timers.runAll();
  await waitFor(() => env.sources.length === 2, 'second event source');
  assert.equal(env.sources[1].url, BASE + '/v1/sse/c-sse?begin=1&since=' + M1 + '@4,' + M2 + '@2');
  await env.client.close({ deleteChannel: false });
});

test('SSE: failure before subscribed probes the channel; 404 creates a new one', async () => {
  const env = setup({ client: { transport: 'sse', channel: 'gone' } }, [
    ['POST', /\/v1\/channels\/gone\/begin$/, () => response(404, { error: { code: 'unknown_channel', message: 'no' } })],
  ]);
  env.client.start();
  await waitFor(() => env.sources.length === 1, 'event source');
  env.sources[0].fail();
  await waitFor(() => env.timers.pending.size === 1, 'reconnect scheduled');
  env.timers.runAll();
  await waitFor(() => env.sources.length === 2, 'second event source');
  assert.equal(env.client.channel, 'ch-1');
  assert.equal(env.sources[1].url, BASE + '/v1/sse/ch-1?begin=1');
  await env.client.close({ deleteChannel: false });
});

test('SSE: a close event with 4410 stops the client', async () => {
  const env = setup({ client: { transport: 'sse', channel: 'c' } });
  env.client.start();
  await waitFor(() => env.sources.length === 1, 'event source');
  env.sources[0].emit('subscribed', { type: 'subscribed', channel: 'c', markets: [M1] });
  env.sources[0].emit('close', { type: 'close', code: 4410, reason: 'channel closed' });
  assert.equal(env.client.connectionState, 'closed');
  assert.equal(env.sources[0].closed, true);
  assert.equal(env.timers.pending.size, 0);
});

test('SSE: a close event with 4411 (lifetime reached) reconnects at once with since', async () => {
  const env = setup({ client: { transport: 'sse', channel: 'c' } });
  env.client.start();
  await waitFor(() => env.sources.length === 1, 'event source');
  env.sources[0].emit('subscribed', { type: 'subscribed', channel: 'c', markets: [M1] });
  env.sources[0].emit('update', upd(M1, 7));
  env.sources[0].emit('close', { type: 'close', code: 4411, reason: 'stream lifetime reached' });
  assert.equal(env.client.connectionState, 'reconnecting');
  assert.equal(env.sources[0].closed, true);
  assert.equal(env.timers.delays[env.timers.delays.length - 1], 0, 'no backoff');
  env.timers.runAll();
  await waitFor(() => env.sources.length === 2, 'second event source');
  assert.equal(env.sources[1].url, BASE + '/v1/sse/c?begin=1&since=' + M1 + '@7');
  assert.equal(env.events.error.length, 0);
  await env.client.close({ deleteChannel: false });
});

test('sameOriginBase keeps ?base= on the page origin', () => {
  const page = 'https://odds.example/live/?base=x';
  assert.equal(StreamPipe.sameOriginBase(null, page), 'https://odds.example');
  assert.equal(StreamPipe.sameOriginBase('', page), 'https://odds.example');
  assert.equal(StreamPipe.sameOriginBase('/edge/', page), 'https://odds.example/edge');
  assert.equal(StreamPipe.sameOriginBase('https://odds.example/edge', page), 'https://odds.example/edge');
  for (const foreign of [
    'https://evil.example',
    '//evil.example/x',
    'http://odds.example',
    'https://odds.example:444',
    'javascript:alert(1)',
    'https://odds.example@evil.example',
  ]) {
    assert.equal(StreamPipe.sameOriginBase(foreign, page), 'https://odds.example', foreign);
  }
});

test('rate() counts applied updates per second over full seconds', async () => {
  let now = 10_000;
  const env = setup({ client: { channel: 'c', now: () => now } });
  env.client.start();
  const ws = await connected(env, 'c');
  for (let i = 1; i <= 10; i++) ws.frame(upd(M1, i));
  ws.frame(upd(M1, 10)); // duplicate: not counted
  now = 11_000;
  for (let i = 11; i <= 30; i++) ws.frame(upd(M1, i));
  now = 12_500;
  assert.equal(env.client.rate(5000), 15); // (10 + 20) / 2 elapsed seconds
  await env.client.close({ deleteChannel: false });
});

test("the 'rate' event fires every second while started, if listened to", async () => {
  let now = 20_000;
  const env = setup({ client: { channel: 'c', now: () => now } });
  const rates = [];
  env.client.start();
  const ws = await connected(env, 'c');
  assert.equal(env.timers.pending.size, 0, 'no rate timer without a listener');
  env.client.on('rate', (r) => rates.push(r.perSecond));
  assert.equal(env.timers.pending.size, 1);
  assert.equal(env.timers.delays[0], 1000);
  for (let i = 1; i <= 4; i++) ws.frame(upd(M1, i));
  now = 21_000;
  env.timers.runAll();
  assert.deepEqual(rates, [4]);
  assert.equal(env.timers.pending.size, 1, 'rescheduled');
  await env.client.close({ deleteChannel: false });
  assert.equal(env.timers.pending.size, 0, 'stopped by close()');
});

test('a listener that throws does not break the client', async () => {
  const env = setup();
  const orig = console.error;
  console.error = () => {};
  try {
    env.client.on('update', () => {
      throw new Error('boom');
    });
    env.client.start();
    const ws = await connected(env);
    ws.frame(upd(M1, 1));
    ws.frame(upd(M1, 2));
    assert.equal(env.client.versions[M1], 2);
  } finally {
    console.error = orig;
  }
  await env.client.close({ deleteChannel: false });
});

test("in a page, the 'online' event retries at once", async () => {
  const src = fs.readFileSync(LIB, 'utf8');
  const handlers = {};
  const sandbox = {
    setTimeout,
    clearTimeout,
    addEventListener: (e, f) => (handlers[e] = f),
    removeEventListener: (e, f) => handlers[e] === f && delete handlers[e],
  };
  sandbox.window = sandbox;
  vm.runInNewContext(src, sandbox);
  const env = setup();
  const client = new sandbox.StreamPipe({
    baseUrl: BASE,
    markets: [M1],
    WebSocket: env.client._WebSocket,
    fetch: env.client._fetch,
    setTimeout: env.timers.setTimeout,
    clearTimeout: env.timers.clearTimeout,
  });
  client.start();
  await waitFor(() => env.sockets.length === 1, 'socket');
  env.sockets[0].subscribed('ch-1', [M1]);
  env.sockets[0].serverClose(1006);
  assert.equal(env.timers.pending.size, 1);
  handlers.online();
  assert.equal(env.timers.pending.size, 0, 'backoff timer cancelled');
  await waitFor(() => env.sockets.length === 2, 'second socket without running the timer');
  await client.close({ deleteChannel: false });
  assert.equal(handlers.online, undefined, 'listener removed by close()');
});

test('as a classic script it defines window.StreamPipe', () => {
  const src = fs.readFileSync(LIB, 'utf8');
  const sandbox = {};
  sandbox.window = sandbox;
  vm.runInNewContext(src, sandbox);
  assert.equal(typeof sandbox.StreamPipe, 'function');
  const c = new sandbox.StreamPipe({ baseUrl: BASE, markets: [M1], WebSocket: function () {}, fetch: async () => {} });
  assert.equal(c.connectionState, 'idle');
});

// ---- tokens (protocol v2) ------------------------------------------------------

function jwt(claims) {
  const b = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  return b({ alg: 'HS256', typ: 'JWT' }) + '.' + b(claims) + '.sig';
}

test('a token goes in Authorization and the WebSocket subprotocol, never in a URL', async () => {
  const t = jwt({ sub: 'u', exp: Math.floor(Date.now() / 1000) + 3600 });
  const env = setup({ client: { token: t } });
  env.client.start();
  const ws = await connected(env);
  assert.equal(env.calls[0].init.headers.authorization, 'Bearer ' + t);
  assert.deepEqual(ws.protocols, ['streampipe.v2', 'bearer.' + t]);
  assert.ok(!ws.url.includes(t));
  await env.client.close({ deleteChannel: false });
});

test('without a token the WebSocket offers only streampipe.v2 and REST sends no Authorization', async () => {
  const env = setup();
  env.client.start();
  const ws = await connected(env);
  assert.deepEqual(ws.protocols, ['streampipe.v2']);
  assert.equal(env.calls[0].init.headers.authorization, undefined);
  await env.client.close({ deleteChannel: false });
});

test('4401 gets a new token from getToken and reconnects at once', async () => {
  let n = 0;
  const env = setup({ client: { getToken: async () => 'tok-' + ++n } });
  env.client.start();
  const ws = await connected(env);
  assert.deepEqual(ws.protocols, ['streampipe.v2', 'bearer.tok-1']);
  ws.serverClose(4401, 'token expired');
  assert.equal(env.timers.delays[env.timers.delays.length - 1], 0);
  env.timers.runAll();
  await waitFor(() => env.sockets.length === 2, 'reconnect');
  assert.deepEqual(env.sockets[1].protocols, ['streampipe.v2', 'bearer.tok-2']);
  await env.client.close({ deleteChannel: false });
});

test('4407 without getToken stops with a fatal error', async () => {
  const env = setup({ client: { token: 'bad' } });
  env.client.start();
  await waitFor(() => env.sockets.length === 1, 'socket');
  env.sockets[0].open();
  env.sockets[0].serverClose(4407, 'token_signature');
  assert.equal(env.client.connectionState, 'closed');
  assert.equal(env.events.error[0].code, 'unauthorized');
  assert.equal(env.events.error[0].fatal, true);
});

test('a WebSocket token is refreshed with a refresh frame before its exp', async () => {
  const now = Date.now();
  const exp = Math.floor(now / 1000) + 100;
  let n = 0;
  const env = setup({ client: { getToken: async () => jwt({ sub: 'u', exp: exp + 100 * n++ }), now: () => now } });
  env.client.start();
  const ws = await connected(env);
  // A refresh is scheduled ~30 s before exp; run it.
  env.timers.runAll();
  await waitFor(() => ws.sent.some((f) => f.type === 'refresh'), 'refresh frame');
  const f = ws.sent.find((x) => x.type === 'refresh');
  assert.equal(StreamPipe.tokenExpiry(f.token), (exp + 100) * 1000);
  await env.client.close({ deleteChannel: false });
});

test('SSE with a token exchanges it for a one-time ticket; `expired` reconnects with a new one', async () => {
  let tickets = 0;
  const env = setup({ client: { transport: 'sse', token: 'tok' } }, [
    ['POST', /\/v1\/channels\/[^/]+\/tickets$/, () => response(201, { ticket: 'tk' + ++tickets })],
  ]);
  env.client.start();
  await waitFor(() => env.sources.length === 1, 'event source');
  assert.ok(env.sources[0].url.includes('ticket=tk1'), env.sources[0].url);
  assert.ok(!env.sources[0].url.includes('tok&') && !env.sources[0].url.endsWith('tok'));
  const ticketCall = env.calls.find((c) => c.url.endsWith('/tickets'));
  assert.equal(ticketCall.init.headers.authorization, 'Bearer tok');
  env.sources[0].emit('subscribed', { type: 'subscribed', channel: 'ch-1', markets: [M1] });
  env.sources[0].emit('expired', { type: 'expired', code: 4401, reason: 'token expired' });
  env.timers.runAll();
  await waitFor(() => env.sources.length === 2, 'second event source');
  assert.ok(env.sources[1].url.includes('ticket=tk2'), env.sources[1].url);
  await env.client.close({ deleteChannel: false });
});

// ---- snapshots (first paint from a cacheable snapshot, then since) --------

test('snapshotPaths are canonical: sorted, deduplicated, split within the limits', () => {
  assert.deepEqual(StreamPipe.snapshotPaths([M2, M1, M2, 'bad id', '']), ['/v1/snapshot?markets=' + M1 + ',' + M2]);
  assert.deepEqual(StreamPipe.snapshotPaths([]), []);
  const many = Array.from({ length: 250 }, (_, i) => 'm' + String(i).padStart(3, '0'));
  const paths = StreamPipe.snapshotPaths(many.slice().reverse());
  assert.equal(paths.length, 3);
  assert.equal(paths[0].split('=')[1].split(',').length, 100);
  assert.deepEqual(paths.flatMap((p) => p.split('=')[1].split(',')), many);
  // Long ids: the 4 KiB query bound cuts first.
  const long = Array.from({ length: 60 }, (_, i) => String(i).padStart(3, '0') + 'x'.repeat(120));
  for (const p of StreamPipe.snapshotPaths(long)) {
    assert.ok(p.length - '/v1/snapshot?'.length <= 4096, 'query within 4 KiB');
  }
  assert.deepEqual(StreamPipe.snapshotPaths(long).flatMap((p) => p.split('=')[1].split(',')), long);
});

test('snapshot first: the stream opens after it, with since = its versions (stale snapshot, no gap)', async () => {
  const snap = {
    at: 1000,
    markets: { [M1]: upd(M1, 5, { home: 1 }, 900), [M2]: upd(M2, 3, { home: 2 }, 1000) },
    missing: [],
  };
  const env = setup({ client: { snapshot: true } }, [['GET', /\/v1\/snapshot$/, () => response(200, snap)]]);
  const snapshots = [];
  env.client.on('snapshot', (s) => snapshots.push(s));
  env.client.start();
  await waitFor(() => env.sockets.length === 1, 'socket');
  // The snapshot came first, on its canonical URL, then the channel.
  assert.equal(env.calls[0].method, 'GET');
  assert.equal(env.calls[0].url, BASE + '/v1/snapshot?markets=' + M1 + ',' + M2);
  assert.equal(env.calls[1].url, BASE + '/v1/channels');
  assert.deepEqual(env.events.update.map((u) => [u.market, u.version]), [[M1, 5], [M2, 3]]);
  assert.equal(snapshots.length, 1);
  assert.equal(env.client.stats.lastLatencyMs, null, 'a snapshot is no stream latency');
  const ws = env.sockets[0];
  ws.subscribed('ch-1', [M1, M2]);
  assert.deepEqual(ws.sent, [{ type: 'begin', since: { [M1]: 5, [M2]: 3 } }]);
  // The server replays what is newer; an old one (repeated) is dropped.
  ws.frame(upd(M1, 7));
  ws.frame(upd(M2, 3));
  ws.frame(upd(M1, 8));
  assert.deepEqual(env.events.update.slice(2).map((u) => [u.market, u.version]), [[M1, 7], [M1, 8]]);
  assert.equal(env.events.duplicate.length, 1);
  await env.client.close({ deleteChannel: false });
});

test('snapshot first with queries also loads what each query matches now', async () => {
  const Q = 'market^=football.;status=open';
  const qm = 'football.cup.9:match_odds';
  const env = setup({ client: { snapshot: true, queries: [Q] } }, [
    ['POST', /\/v1\/channels\/[^/]+\/queries$/, () => response(200, { channel: 'ch-1', queries: [Q] })],
    ['GET', /\/v1\/snapshot$/, (c) =>
      c.url.includes('query=')
        ? response(200, { query: Q, truncated: false, at: 5, markets: { [qm]: upd(qm, 4) }, missing: [] })
        : response(200, { at: 1, markets: { [M1]: upd(M1, 2) }, missing: [M2] })],
  ]);
  env.client.start();
  await waitFor(() => env.sockets.length === 1, 'socket');
  const urls = env.calls.filter((c) => c.method === 'GET').map((c) => c.url);
  assert.ok(urls.includes(BASE + '/v1/snapshot?query=' + encodeURIComponent(Q)), urls.join(' '));
  assert.equal(StreamPipe.querySnapshotPath(Q), '/v1/snapshot?query=market%5E%3Dfootball.%3Bstatus%3Dopen');
  env.sockets[0].subscribed('ch-1', [M1, M2]);
  const begin = env.sockets[0].sent[0];
  assert.equal(begin.since[qm], 4, 'the query market resumes from its snapshot version');
  assert.equal(begin.since[M1], 2);
  await env.client.close({ deleteChannel: false });
});

test('a failed snapshot is an error event, and the stream still starts (full begin)', async () => {
  const env = setup({ client: { snapshot: true } }, [
    ['GET', /\/v1\/snapshot$/, () => response(503, { error: { code: 'unavailable', message: 'unavailable' } })],
  ]);
  env.client.start();
  await waitFor(() => env.sockets.length === 1, 'socket');
  assert.equal(env.events.error.length, 1);
  assert.equal(env.events.error[0].code, 'unavailable');
  assert.equal(env.events.error[0].fatal, false);
  env.sockets[0].subscribed('ch-1', [M1, M2]);
  assert.deepEqual(env.sockets[0].sent, [{ type: 'begin' }]);
  await env.client.close({ deleteChannel: false });
});

test('loadSnapshot sends the token, keeps newer local versions, and reports missing markets', async () => {
  const snap = { at: 5, markets: { [M1]: upd(M1, 4) }, missing: [M2] };
  const env = setup({ client: { token: 'tok', versions: { [M1]: 9 } } }, [
    ['GET', /\/v1\/snapshot$/, () => response(200, snap)],
  ]);
  const got = await env.client.loadSnapshot();
  assert.equal(env.calls[0].init.headers.authorization, 'Bearer tok');
  assert.deepEqual(got.missing, [M2]);
  assert.equal(got.at, 5);
  assert.equal(env.client.versions[M1], 9, 'an older snapshot never moves a version back');
  assert.equal(env.events.update.length, 0);
});

/*
 * streampipe.js: browser client for the streampipe publisher (protocol v2,
 * docs/protocol.md, "Browser-facing API"). No dependencies, no build step.
 * A classic <script> defines `window.StreamPipe`; under Node (CommonJS)
 * `module.exports = StreamPipe`.
 *
 *   const sp = new StreamPipe({ baseUrl: 'https://odds.example.com',
 *                               markets: ['football.epl.1000:match_odds'] });
 *   sp.on('update', u => render(u.market, u.payload));
 *   sp.on('state', s => console.log('connection', s));
 *   sp.start();
 *
 * Constructor options
 *   baseUrl     publisher origin (and optional path prefix), e.g.
 *               'https://host:8080' or 'https://host/odds'. Default: the
 *               page's location.origin. The stream URL swaps http(s) for ws(s).
 *   markets     market ids to subscribe to when a channel is created.
 *   queries     query subscriptions to add when a channel is created (e.g.
 *               ['market^=football.;status=open']; grammar in
 *               docs/protocol.md, "Query subscriptions"): matching markets
 *               stream without being named, also ones created later.
 *   channel     an existing channel id; when absent start() creates one with
 *               POST /v1/channels. The id in use is `sp.channel`.
 *   token       a signed token from the bookmaker's backend (protocol v2;
 *               omit against an anonymous publisher). Sent as
 *               `Authorization: Bearer` to the REST API, as the WebSocket
 *               subprotocol entry `bearer.<token>` next to `streampipe.v2`,
 *               and exchanged for a one-time SSE ticket; never in a URL.
 *   getToken    async () => token: called before each connection and when
 *               the token expires (close 4401, SSE `expired`), and ~30 s
 *               before its `exp` on a WebSocket, whose stream then gets a
 *               `refresh` frame instead of a reconnect. Takes precedence
 *               over `token`.
 *   transport   'ws' (default when WebSocket exists) or 'sse'.
 *   versions    initial market -> version map (e.g. restored from storage):
 *               the first begin resumes from it with `since`.
 *   fromMs      a time (ms since the epoch, e.g. when the user last looked):
 *               history markets with no known version resume from it
 *               (`from_ms` in every begin and on the SSE URL): their events
 *               since then are replayed, with a `recovered` frame first.
 *   snapshot    true: start() first loads the markets' cacheable snapshot
 *               (loadSnapshot()), then opens the stream with `since` = the
 *               snapshot's versions. A failed snapshot only costs the
 *               shortcut (an `error` event; the stream's begin sends all).
 *   backoff     {min: 250, max: 10000, factor: 2, jitter: 0.5} (ms). Delay of
 *               reconnect attempt n (from 0): d = min(max, min * factor^n),
 *               randomised into [d * (1 - jitter), d]. The attempt counter
 *               goes back to 0 when a connection reaches `subscribed`.
 *   deleteOnClose  close() deletes the channel (default true).
 *   beginMinIntervalMs  least time between two begin frames on one
 *               connection (default 600; the server defers a begin within
 *               500 ms of the previous one): a begin asked for sooner is
 *               deferred, and requests meanwhile are merged into it.
 *   WebSocket, EventSource, fetch   constructors / function to use instead of
 *               the globals (tests, polyfills).
 *   setTimeout, clearTimeout, now, random   injectable clock and randomness.
 *
 * In a page, the browser's `online` event cuts a pending backoff short.
 *
 * Properties
 *   channel          channel id in use (null until created)
 *   markets          market ids of the channel (array; markets brought by a
 *                    query are added at their first update, dropped on `removed`)
 *   queries          the channel's queries (canonical once the server answered)
 *   versions         market -> last applied version (null-prototype object)
 *   state            market -> last applied update message (null-prototype object)
 *   connectionState  'idle' | 'connecting' | 'subscribed' | 'live' |
 *                    'reconnecting' | 'closed'
 *   lastClose        {code, reason} of the last stream close, or null
 *   stats            {updates, duplicates, reconnects, lastLatencyMs,
 *                     lastUpdateAt, connects}
 *
 * Methods
 *   start()              connect (creating the channel if needed); returns this
 *   close({deleteChannel = deleteOnClose})  stop for good: close the stream,
 *                        DELETE /v1/channels/<id>; returns a promise
 *   addMarkets(list)     POST /v1/channels/<id>/markets, then asks for the new
 *                        markets' state (begin); resolves to the market list
 *   removeMarket(m)      DELETE /v1/channels/<id>/markets/<m>; forgets m's
 *                        version and state and ignores its late updates
 *   addQuery(q)          POST /v1/channels/<id>/queries {query}; resolves to
 *                        the channel's queries (canonical). Matching markets
 *                        then arrive as updates, their state first.
 *   removeQuery(q)       DELETE /v1/channels/<id>/queries?query=<q>; the
 *                        markets only it brought leave (`removed` events)
 *   loadSnapshot(list = markets)  GET /v1/snapshot?markets=... (and, by
 *                        default, ?query=... for each of the client's queries:
 *                        the markets it matches now), (canonical:
 *                        sorted, deduplicated, split into requests of at most
 *                        100 markets / 4 KiB, answered by a CDN when one is
 *                        in front): applies every market's state like an
 *                        update (an `update` event each, versions recorded),
 *                        so the stream opened afterwards asks only for newer
 *                        versions. Resolves to {markets, missing, at}; emits
 *                        `snapshot` with the same. A stale (cached) snapshot
 *                        is fine: the stream's begin sends whatever is newer.
 *   StreamPipe.snapshotPaths(list)  the canonical request paths for a list
 *   rate(windowMs=5000)  applied updates per second over the last full seconds
 *   on(event, fn)        subscribe; returns a function that unsubscribes
 *   off(event, fn)
 *
 * Events
 *   update     (msg)   an update newer than the last applied one for its market:
 *                      {type:'update', market, version, ts, payload}
 *   duplicate  (msg)   an update dropped because its version was not newer
 *   state      (s)     connection state changed (see connectionState)
 *   subscribed (msg)   the `subscribed` frame {channel, markets}
 *   reset      (msg)   the `reset` frame; begin (with since) is sent again
 *   recovered  (msg)   a history market was resumed by a begin:
 *                      {type:'recovered', market, since | from_ms, recovered, replayed};
 *                      recovered true: the `replayed` events missed after
 *                      `since` follow in order; false: the history did not
 *                      cover the gap (trimmed), its latest state follows.
 *                      Also kept in client.recovered[market].
 *   removed    (msg)   {type:'removed', market}: the channel no longer
 *                      receives the market (removed, or it stopped matching
 *                      the channel's queries); its version and state are
 *                      forgotten (a query may bring it back later)
 *   channel    (id)    a channel was created (initially, or after 4404;
 *                      the client's queries are added to it)
 *   error      (err)   Error with .code (API error code, close code, or
 *                      'network' / 'bad_frame' / ...), .status (HTTP status
 *                      if any) and .fatal (true when the client stopped)
 *   rate       ({perSecond})  once a second while started, if listened to
 *   snapshot   ({markets, missing, at})  a snapshot was loaded and applied
 *
 * Stream behaviour
 *   WebSocket: on `subscribed` send {"type":"begin","since":{m: version, ...}}
 *   (since omitted when no version is known; trimmed to keep the frame within
 *   the server's 4 KiB limit). Entries that do not fit go in the connect URL,
 *   /v1/stream/<id>?since=m@v,... (at most 4096 characters); markets left out
 *   of both are replayed in full and deduplicated here. On `reset`, and after
 *   addMarkets(), send begin again (throttled, see beginMinIntervalMs).
 *   SSE: GET /v1/sse/<id>?begin=1&since=m@v,m@v; on `reset`,
 *   POST /v1/channels/<id>/begin, or, once a `recovered` frame showed that
 *   the pipeline keeps event history, a reconnect with since (a REST begin
 *   sends latest states only, the reconnect replays missed events). EventSource's own retry is not used: the
 *   client reconnects itself so `since` is current. An SSE `close` event
 *   {"type":"close","code":N} is handled like a WebSocket close code N. When an
 *   SSE connection fails before `subscribed`, the client probes the channel
 *   with POST /v1/channels/<id>/begin; 404 means unknown channel (as 4404).
 *   Close codes: 1001, 1006, 1011, 4408, 4409 and any code not listed below ->
 *   reconnect with backoff and since; 4411 (stream lifetime reached) ->
 *   reconnect at once (first attempt) with since; 4412 (history gap: the
 *   client fell behind on a history market) -> reconnect at once with since,
 *   the missed events are replayed; 4401 (token expired) ->
 *   get a new token and reconnect at once; 4407 (no valid token) -> with
 *   getToken, a new token and reconnect with backoff, else stop with a fatal
 *   error; 4404 -> create a new channel (at once
 *   the first time, then with backoff) and connect; 1000, 4410 -> stop;
 *   1002, 1003, 1007, 1008, 1009, 4400, 4403 -> stop with a fatal error.
 *   Channel creation: 5xx, 408, 429 and network errors are retried with
 *   backoff; other 4xx stop with a fatal error.
 */
(function (root, factory) {
  'use strict';
  var StreamPipe = factory();
  if (typeof module === 'object' && module && module.exports) {
    module.exports = StreamPipe;
  } else if (root) {
    root.StreamPipe = StreamPipe;
  }
})(typeof window !== 'undefined' ? window : (typeof globalThis !== 'undefined' ? globalThis : this), function () {
  'use strict';

  const STOP_CODES = new Set([1000, 4410]);
  const FATAL_CODES = new Set([1002, 1003, 1007, 1008, 1009, 4400, 4403]);
  const UNKNOWN_CHANNEL = 4404;
  const LIFETIME_REACHED = 4411; // the stream's maximum lifetime: reconnect at once with since
  const HISTORY_GAP = 4412; // behind on a history market: reconnect at once with since (replayed)
  const TOKEN_EXPIRED = 4401; // get a new token, reconnect at once with since
  const UNAUTHORIZED = 4407; // no valid token: a new one (getToken) or stop
  const WS_PROTOCOL = 'streampipe.v2';
  const REFRESH_BEFORE_MS = 30000; // refresh a WebSocket's token this long before its exp
  const ID_RE = /^[A-Za-z0-9._:-]{1,128}$/;
  const validVersion = (v) => Number.isSafeInteger(v) && v >= 1;
  const MAX_CLIENT_FRAME = 4096; // bytes; server closes bigger frames with 1009/4400
  const MAX_SINCE_QUERY = 4096; // characters of the SSE since= value
  const MAX_SNAPSHOT_MARKETS = 100; // markets per snapshot request (server limit)
  const MAX_SNAPSHOT_QUERY = 4096; // bytes of a snapshot's canonical markets=... query

  class StreamPipeError extends Error {
    constructor(code, message, extra) {
      super(message || code);
      this.name = 'StreamPipeError';
      this.code = code;
      this.fatal = false;
      if (extra) Object.assign(this, extra);
    }
  }

  function uniqStrings(list) {
    const out = [];
    const seen = new Set();
    for (const m of list || []) {
      if (typeof m === 'string' && m && !seen.has(m)) {
        seen.add(m);
        out.push(m);
      }
    }
    return out;
  }

  // Ids are [A-Za-z0-9._:-]; anything else is percent-encoded defensively.
  function encId(s) {
    return String(s).replace(/[^A-Za-z0-9._\-:]/g, encodeURIComponent);
  }

  function globalRef(name) {
    return typeof globalThis !== 'undefined' ? globalThis[name] : undefined;
  }

  function resolveBase(baseUrl) {
    let base = baseUrl;
    if (!base) {
      const loc = globalRef('location');
      if (!loc || !loc.origin || loc.origin === 'null') {
        throw new StreamPipeError('config', 'StreamPipe: baseUrl is required outside a web page');
      }
      base = loc.origin;
    }
    base = String(base).replace(/\/+$/, '');
    if (!/^https?:\/\//i.test(base)) {
      throw new StreamPipeError('config', 'StreamPipe: baseUrl must start with http:// or https://');
    }
    return base;
  }

  class StreamPipe {
    constructor(opts) {
      opts = opts || {};
      this.baseUrl = resolveBase(opts.baseUrl);
      this.markets = uniqStrings(opts.markets);
      this.queries = uniqStrings(opts.queries);
      this.channel = opts.channel || null;
      this._tokenValue = typeof opts.token === 'string' && opts.token ? opts.token : null;
      this._getToken = typeof opts.getToken === 'function' ? opts.getToken : null;
      this._refreshTimer = null;
      this._WebSocket = opts.WebSocket || globalRef('WebSocket');
      this._EventSource = opts.EventSource || globalRef('EventSource');
      const f = opts.fetch || globalRef('fetch');
      this._fetch = f ? (url, init) => f(url, init) : null;
      this.transport = opts.transport || (this._WebSocket || !this._EventSource ? 'ws' : 'sse');
      if (this.transport !== 'ws' && this.transport !== 'sse') {
        throw new StreamPipeError('config', "StreamPipe: transport must be 'ws' or 'sse'");
      }
      this.backoff = Object.assign({ min: 250, max: 10000, factor: 2, jitter: 0.5 }, opts.backoff || {});
      this.deleteOnClose = opts.deleteOnClose !== false;
      this.beginMinIntervalMs = typeof opts.beginMinIntervalMs === 'number' ? opts.beginMinIntervalMs : 600;
      this._setTimeout = opts.setTimeout || ((fn, ms) => setTimeout(fn, ms));
      this._clearTimeout = opts.clearTimeout || ((t) => clearTimeout(t));
      this._now = opts.now || (() => Date.now());
      this._random = opts.random || Math.random;

      this._snapshotFirst = opts.snapshot === true;
      this.fromMs = Number.isSafeInteger(opts.fromMs) && opts.fromMs >= 0 ? opts.fromMs : null;
      this.versions = Object.create(null);
      // market -> whether the last begin's history replay covered the gap
      this.recovered = Object.create(null);
      this._history = false; // a `recovered` frame was seen: history kept
      if (opts.versions) {
        for (const m of Object.keys(opts.versions)) {
          const v = opts.versions[m];
          if (ID_RE.test(m) && validVersion(v)) this.versions[m] = v;
        }
      }
      this.state = Object.create(null);
      this.connectionState = 'idle';
      this.lastClose = null;
      this.stats = {
        updates: 0,
        duplicates: 0,
        reconnects: 0,
        connects: 0,
        lastLatencyMs: null,
        lastUpdateAt: null,
      };

      this._listeners = Object.create(null);
      this._removed = new Set();
      this._started = false;
      this._gen = 0; // bumped on every connection attempt and on close()
      this._ws = null;
      this._es = null;
      this._subscribedConn = false;
      this._attempt = 0;
      this._retryTimer = null;
      this._rateTimer = null;
      this._beginTimer = null;
      this._lastBeginAt = null; // per connection
      this._onOnline = null;
      this._creating = null;
      this._channelGone = false;
      this._buckets = []; // [second, count], oldest first
      this._startSec = 0;
    }

    // ---- tokens -------------------------------------------------------
    // The token to use now; asks getToken when `fresh` or none is cached.
    async _token(fresh) {
      if (this._getToken && (fresh || !this._tokenValue)) {
        let t;
        try {
          t = await this._getToken();
        } catch (e) {
          throw new StreamPipeError('token', 'getToken failed: ' + (e && e.message), { transient: true, cause: e });
        }
        if (typeof t !== 'string' || !t) throw new StreamPipeError('token', 'getToken returned no token', { transient: true });
        this._tokenValue = t;
      }
      return this._tokenValue;
    }

    // exp (ms since the epoch) of a JWT, or null.
    static tokenExpiry(token) {
      try {
        const part = String(token).split('.')[1];
        const b64 = part.replace(/-/g, '+').replace(/_/g, '/');
        const pad = b64 + '==='.slice((b64.length + 3) % 4);
        const json = typeof atob === 'function' ? atob(pad) : Buffer.from(pad, 'base64').toString('binary');
        const exp = JSON.parse(json).exp;
        return typeof exp === 'number' ? exp * 1000 : null;
      } catch (e) {
        return null;
      }
    }

    // On a WebSocket, replace the token before it expires (refresh frame).
    _scheduleRefresh(ws) {
      if (this._refreshTimer !== null) this._clearTimeout(this._refreshTimer);
      this._refreshTimer = null;
      if (!this._getToken || !this._tokenValue) return;
      const exp = StreamPipe.tokenExpiry(this._tokenValue);
      if (exp === null) return;
      const delay = Math.max(1000, exp - REFRESH_BEFORE_MS - this._now());
      this._refreshTimer = this._setTimeout(async () => {
        this._refreshTimer = null;
        if (this._ws !== ws) return;
        try {
          const t = await this._token(true);
          if (this._ws === ws) ws.send(JSON.stringify({ type: 'refresh', token: t }));
        } catch (e) {
          this._error(e, false); // the 4401 close that follows reconnects
        }
      }, delay);
    }

    // ---- events -------------------------------------------------------
    on(event, fn) {
      (this._listeners[event] || (this._listeners[event] = [])).push(fn);
      if (event === 'rate') this._ensureRateTimer();
      return () => this.off(event, fn);
    }

    off(event, fn) {
      const l = this._listeners[event];
      if (!l) return;
      const i = l.indexOf(fn);
      if (i >= 0) l.splice(i, 1);
    }

    _emit(event, arg) {
      const l = this._listeners[event];
      if (!l || !l.length) return;
      for (const fn of l.slice()) {
        try {
          fn.call(this, arg);
        } catch (e) {
          if (typeof console !== 'undefined') console.error('StreamPipe: "' + event + '" listener threw', e);
        }
      }
    }

    _error(err, fatal) {
      if (!(err instanceof Error)) err = new StreamPipeError('error', String(err));
      if (fatal) err.fatal = true;
      this._emit('error', err);
    }

    _setState(s) {
      if (this.connectionState === s) return;
      this.connectionState = s;
      this._emit('state', s);
    }

    // ---- lifecycle ----------------------------------------------------
    start() {
      if (this._started) return this;
      this._started = true;
      this._attempt = 0;
      if (this._channelGone) {
        this.channel = null;
        this._channelGone = false;
      }
      this._startSec = Math.floor(this._now() / 1000);
      this._setState('connecting');
      this._ensureRateTimer();
      // Back online: retry now rather than at the end of the backoff delay.
      if (!this._onOnline && typeof window !== 'undefined' && window && typeof window.addEventListener === 'function') {
        this._onOnline = () => {
          if (this._started && this._retryTimer !== null) {
            this._clearTimeout(this._retryTimer);
            this._retryTimer = null;
            this._connect();
          }
        };
        window.addEventListener('online', this._onOnline);
      }
      if (this._snapshotFirst) {
        // Only the first start: later connects resume from `versions`.
        this._snapshotFirst = false;
        const gen = this._gen;
        this.loadSnapshot()
          .catch((e) => this._error(e, false))
          .then(() => {
            if (this._started && this._gen === gen) this._connect();
          });
        return this;
      }
      this._connect();
      return this;
    }

    // ---- snapshots ----------------------------------------------------
    // Canonical snapshot paths for `list`: ids sorted (code unit order is
    // byte order for the ASCII ids), deduplicated, in chunks within the
    // server's limits, so equal sets share one CDN cache entry.
    static snapshotPaths(list) {
      const ids = uniqStrings(list).filter((m) => ID_RE.test(m)).sort();
      const paths = [];
      let chunk = [];
      let size = 'markets='.length;
      for (const m of ids) {
        const add = m.length + (chunk.length ? 1 : 0);
        if (chunk.length && (chunk.length >= MAX_SNAPSHOT_MARKETS || size + add > MAX_SNAPSHOT_QUERY)) {
          paths.push('/v1/snapshot?markets=' + chunk.join(','));
          chunk = [];
          size = 'markets='.length;
        }
        size += m.length + (chunk.length ? 1 : 0);
        chunk.push(m);
      }
      if (chunk.length) paths.push('/v1/snapshot?markets=' + chunk.join(','));
      return paths;
    }

    // The snapshot path of a query: the server answers its canonical
    // spelling and redirects others to it (fetch follows), so a CDN holds
    // one entry per query.
    static querySnapshotPath(query) {
      return '/v1/snapshot?query=' + encodeURIComponent(query);
    }

    async loadSnapshot(list) {
      const paths = StreamPipe.snapshotPaths(list === undefined ? this.markets : list);
      // By default also the markets the client's queries match now.
      if (list === undefined) for (const q of this.queries) paths.push(StreamPipe.querySnapshotPath(q));
      const parts = await Promise.all(paths.map((p) => this._api('GET', p)));
      const out = { markets: Object.create(null), missing: [], at: null };
      for (const data of parts) {
        if (!data || typeof data !== 'object') continue;
        const markets = data.markets && typeof data.markets === 'object' ? data.markets : {};
        for (const m of Object.keys(markets)) {
          const msg = markets[m];
          if (!msg || typeof msg !== 'object' || msg.market !== m) continue;
          out.markets[m] = msg;
          this._onUpdate(msg, true); // applied if newer than what we have
        }
        if (Array.isArray(data.missing)) out.missing.push(...data.missing);
        if (typeof data.at === 'number' && (out.at === null || data.at > out.at)) out.at = data.at;
      }
      this._emit('snapshot', out);
      return out;
    }

    async close(opts) {
      const deleteChannel = opts && opts.deleteChannel !== undefined ? !!opts.deleteChannel : this.deleteOnClose;
      this._shutdown();
      this._setState('closed');
      if (this._creating) {
        try {
          await this._creating;
        } catch (e) {
          /* creation failed: nothing to delete */
        }
      }
      const ch = this.channel;
      // After 4410 the channel was already closed through the API.
      if (!ch || !deleteChannel || this._channelGone) return;
      this.channel = null;
      try {
        await this._api('DELETE', '/v1/channels/' + encId(ch), undefined, { keepalive: true });
      } catch (e) {
        if (e.status !== 404) this._error(e, false);
      }
    }

    // Stops timers and the stream; no state change, no channel deletion.
    _shutdown() {
      this._started = false;
      this._gen++;
      if (this._retryTimer !== null) this._clearTimeout(this._retryTimer);
      this._retryTimer = null;
      if (this._rateTimer !== null) this._clearTimeout(this._rateTimer);
      this._rateTimer = null;
      if (this._onOnline && typeof window !== 'undefined' && window && typeof window.removeEventListener === 'function') {
        window.removeEventListener('online', this._onOnline);
      }
      this._onOnline = null;
      this._dropStream(1000, 'client closed');
      if (this._refreshTimer !== null) this._clearTimeout(this._refreshTimer);
      this._refreshTimer = null;
    }

    _dropStream(code, reason) {
      const ws = this._ws;
      const es = this._es;
      this._ws = null;
      this._es = null;
      this._subscribedConn = false;
      this._lastBeginAt = null;
      if (this._beginTimer !== null) this._clearTimeout(this._beginTimer);
      this._beginTimer = null;
      if (ws) {
        try {
          ws.close(code, reason);
        } catch (e) {
          /* already closing */
        }
      }
      if (es) {
        try {
          es.close();
        } catch (e) {
          /* ignore */
        }
      }
    }

    // Terminal stop caused by the server or a fatal error.
    _stop(err) {
      this._shutdown();
      this._setState('closed');
      if (err) this._error(err, true);
    }

    async _connect() {
      const gen = ++this._gen;
      if (!this._started) return;
      if (!this.channel) {
        try {
          await this._createChannel();
        } catch (err) {
          if (gen !== this._gen || !this._started) return;
          const transient = err.transient || err.code === 'network';
          if (!transient) {
            this._stop(err);
            return;
          }
          this._error(err, false);
          this._scheduleReconnect(false);
          return;
        }
        if (gen !== this._gen || !this._started) return;
      }
      let token = null;
      try {
        token = await this._token(false);
      } catch (err) {
        if (gen !== this._gen || !this._started) return;
        this._error(err, false);
        this._scheduleReconnect(false);
        return;
      }
      if (gen !== this._gen || !this._started) return;
      this.stats.connects++;
      if (this.transport === 'sse') this._openSse(gen, token);
      else this._openWs(gen, token);
    }

    _createChannel() {
      const p = (async () => {
        const res = await this._api('POST', '/v1/channels', { markets: this.markets.slice() });
        if (!res || typeof res.channel !== 'string' || !res.channel) {
          throw new StreamPipeError('bad_response', 'POST /v1/channels: no channel id in the response', { transient: true });
        }
        this.channel = res.channel;
        this._channelGone = false;
        if (Array.isArray(res.markets)) this.markets = uniqStrings(res.markets);
        // A new channel (also after 4404) gets the client's queries; a
        // refused one is an error event, the channel still serves the rest.
        for (const q of this.queries.slice()) {
          try {
            await this._postQuery(q);
          } catch (e) {
            this._error(e, false);
          }
        }
        this._emit('channel', res.channel);
        return res.channel;
      })();
      this._creating = p;
      const done = () => {
        if (this._creating === p) this._creating = null;
      };
      p.then(done, done);
      return p;
    }

    _backoffDelay(attempt) {
      const b = this.backoff;
      const d = Math.min(b.max, b.min * Math.pow(b.factor, attempt));
      const j = Math.min(1, Math.max(0, b.jitter));
      return Math.max(0, Math.round(d * (1 - j * this._random())));
    }

    _scheduleReconnect(immediate) {
      if (!this._started) return;
      this._dropStream(1000, 'reconnecting');
      this._gen++;
      this._setState('reconnecting');
      this.stats.reconnects++;
      const delay = immediate && this._attempt === 0 ? 0 : this._backoffDelay(this._attempt);
      this._attempt++;
      if (this._retryTimer !== null) this._clearTimeout(this._retryTimer);
      this._retryTimer = this._setTimeout(() => {
        this._retryTimer = null;
        this._connect();
      }, delay);
    }

    _onStreamClose(code, reason) {
      if (!this._started) return;
      this.lastClose = { code: code, reason: reason || '' };
      this._subscribedConn = false;
      if (code === UNKNOWN_CHANNEL) {
        this._error(new StreamPipeError('unknown_channel', 'channel ' + this.channel + ' is unknown; creating a new one', { closeCode: code }), false);
        this.channel = null;
        this._scheduleReconnect(true);
      } else if (code === LIFETIME_REACHED || code === HISTORY_GAP) {
        this._scheduleReconnect(true);
      } else if (code === TOKEN_EXPIRED) {
        if (this._getToken) this._tokenValue = null; // fetched anew on connect
        this._scheduleReconnect(true);
      } else if (code === UNAUTHORIZED) {
        if (!this._getToken) {
          this._stop(new StreamPipeError('unauthorized', 'stream refused: no valid token' + (reason ? ' (' + reason + ')' : ''), { closeCode: code }));
        } else {
          this._tokenValue = null;
          this._scheduleReconnect(false);
        }
      } else if (STOP_CODES.has(code)) {
        if (code === 4410) this._channelGone = true;
        this._stop(null);
      } else if (FATAL_CODES.has(code)) {
        this._stop(new StreamPipeError('close_' + code, 'stream closed with ' + code + (reason ? ': ' + reason : ''), { closeCode: code }));
      } else {
        this._scheduleReconnect(false);
      }
    }

    // ---- WebSocket ----------------------------------------------------
    _streamUrl(kind) {
      return this.baseUrl + '/v1/' + kind + '/' + encId(this.channel);
    }

    _openWs(gen, token) {
      const WS = this._WebSocket;
      if (!WS) {
        this._stop(new StreamPipeError('config', 'StreamPipe: no WebSocket implementation'));
        return;
      }
      let url = this._streamUrl('stream').replace(/^http/i, 'ws');
      // What does not fit in the begin frame goes in the query string.
      const inFrame = new Set(this._frameSinceEntries().map((e) => e[0]));
      const overflow = this._sinceQuery(inFrame);
      if (overflow) url += '?since=' + overflow;
      let ws;
      try {
        // The token rides in the subprotocol list; the server echoes only
        // streampipe.v2 (never the token).
        ws = new WS(url, token ? [WS_PROTOCOL, 'bearer.' + token] : [WS_PROTOCOL]);
      } catch (e) {
        this._error(new StreamPipeError('network', e && e.message, { cause: e }), false);
        this._scheduleReconnect(false);
        return;
      }
      this._ws = ws;
      this._subscribedConn = false;
      this._scheduleRefresh(ws);
      const mine = () => this._ws === ws && this._gen === gen;
      ws.onmessage = (ev) => {
        if (mine()) this._onFrame(ev.data);
      };
      ws.onerror = () => {
        /* a close event follows */
      };
      ws.onclose = (ev) => {
        if (!mine()) return;
        this._ws = null;
        this._onStreamClose(ev && typeof ev.code === 'number' ? ev.code : 1006, ev && ev.reason);
      };
    }

    // ---- SSE ----------------------------------------------------------
    async _openSse(gen, token) {
      const ES = this._EventSource;
      if (!ES) {
        this._stop(new StreamPipeError('config', 'StreamPipe: no EventSource implementation'));
        return;
      }
      let url = this._streamUrl('sse') + '?begin=1';
      if (token) {
        // EventSource cannot send a header: a one-time ticket instead.
        let res;
        try {
          res = await this._api('POST', '/v1/channels/' + encId(this.channel) + '/tickets');
        } catch (e) {
          if (gen !== this._gen || !this._started) return;
          if (e.status === 404) {
            this._onStreamClose(UNKNOWN_CHANNEL, 'unknown channel');
          } else if (e.status === 401) {
            this._onStreamClose(UNAUTHORIZED, e.message);
          } else {
            this._error(e, false);
            this._scheduleReconnect(false);
          }
          return;
        }
        if (gen !== this._gen || !this._started) return;
        if (!res || typeof res.ticket !== 'string') {
          this._error(new StreamPipeError('bad_response', 'no ticket in the response'), false);
          this._scheduleReconnect(false);
          return;
        }
        url += '&ticket=' + encodeURIComponent(res.ticket);
      }
      const since = this._sinceQuery();
      if (since) url += '&since=' + since;
      if (this.fromMs !== null) url += '&from_ms=' + this.fromMs;
      let es;
      try {
        es = new ES(url);
      } catch (e) {
        this._error(new StreamPipeError('network', e && e.message, { cause: e }), false);
        this._scheduleReconnect(false);
        return;
      }
      this._es = es;
      this._subscribedConn = false;
      const mine = () => this._es === es && this._gen === gen;
      const onEvent = (ev) => {
        if (mine()) this._onFrame(ev.data);
      };
      for (const t of ['subscribed', 'update', 'recovered', 'reset', 'close', 'expired']) es.addEventListener(t, onEvent);
      es.onmessage = onEvent; // unnamed events carry their type in the JSON
      es.onerror = () => {
        if (!mine()) return;
        const hadSubscribed = this._subscribedConn;
        this._es = null;
        this._subscribedConn = false;
        try {
          es.close();
        } catch (e) {
          /* ignore */
        }
        if (hadSubscribed) {
          this._onStreamClose(1006, 'sse connection lost');
        } else {
          this._probeChannel(gen);
        }
      };
    }

    // An SSE connection failed before `subscribed`: EventSource hides the HTTP
    // status, so ask the control API whether the channel still exists.
    async _probeChannel(gen) {
      this._gen++; // park: nothing else may connect meanwhile
      const probeGen = this._gen;
      let code = 1006;
      try {
        await this._api('POST', '/v1/channels/' + encId(this.channel) + '/begin');
      } catch (e) {
        if (e.status === 404) code = UNKNOWN_CHANNEL;
      }
      if (probeGen !== this._gen || !this._started) return;
      this._onStreamClose(code, 'sse connection failed');
    }

    // ---- frames -------------------------------------------------------
    _onFrame(text) {
      let msg;
      try {
        msg = typeof text === 'string' ? JSON.parse(text) : null;
      } catch (e) {
        msg = null;
      }
      if (!msg || typeof msg !== 'object') {
        this._error(new StreamPipeError('bad_frame', 'unparsable frame from the publisher'), false);
        return;
      }
      switch (msg.type) {
        case 'update':
          this._onUpdate(msg);
          break;
        case 'subscribed':
          this._subscribedConn = true;
          this._attempt = 0;
          if (Array.isArray(msg.markets)) {
            this.markets = uniqStrings(msg.markets).filter((m) => !this._removed.has(m));
          }
          this._setState('subscribed');
          this._emit('subscribed', msg);
          if (this.transport === 'ws') this._sendBegin();
          break;
        case 'reset':
          this._emit('reset', msg);
          if (this.transport === 'sse' && this._history) {
            // A REST begin sends latest states; a reconnect with since
            // replays the history markets' missed events.
            this._scheduleReconnect(true);
          } else {
            this._sendBegin();
          }
          break;
        case 'recovered':
          if (typeof msg.market === 'string' && typeof msg.recovered === 'boolean') {
            this._history = true;
            this.recovered[msg.market] = msg.recovered;
            this._emit('recovered', msg);
          }
          break;
        case 'removed':
          if (typeof msg.market === 'string') {
            this.markets = this.markets.filter((m) => m !== msg.market);
            delete this.versions[msg.market];
            delete this.state[msg.market];
            this._emit('removed', msg);
          }
          break;
        case 'refreshed': // WebSocket: the server took the new token
          this._scheduleRefresh(this._ws);
          break;
        case 'expired': // SSE only: the token expired (code 4401)
        case 'close': // SSE only: the server's equivalent of a close code
          if (this._es) {
            const es = this._es;
            this._es = null;
            this._subscribedConn = false;
            try {
              es.close();
            } catch (e) {
              /* ignore */
            }
            this._onStreamClose(typeof msg.code === 'number' ? msg.code : 1006, msg.reason);
          }
          break;
        default:
        // unknown frame types are ignored (forward compatibility)
      }
    }

    // `snapshot`: from loadSnapshot(), so its age is no stream latency.
    _onUpdate(msg, snapshot) {
      const m = msg.market;
      const v = msg.version;
      if (typeof m !== 'string' || !validVersion(v)) {
        this._error(new StreamPipeError('bad_frame', 'update without a market or version'), false);
        return;
      }
      if (this._removed.has(m)) return;
      const last = this.versions[m];
      if (last !== undefined && v <= last) {
        this.stats.duplicates++;
        this._emit('duplicate', msg);
        return;
      }
      // A market a query brought joins the list at its first update.
      if (last === undefined && this.markets.indexOf(m) < 0) this.markets.push(m);
      this.versions[m] = v;
      this.state[m] = msg;
      if (!snapshot) {
        const now = this._now();
        this.stats.updates++;
        this.stats.lastUpdateAt = now;
        if (typeof msg.ts === 'number') this.stats.lastLatencyMs = now - msg.ts;
        this._countRate(now);
        if (this.connectionState === 'subscribed') this._setState('live');
      }
      this._emit('update', msg);
    }

    // `since` entries, trimmed so that the serialised result stays within limit.
    _sinceEntries(limit, overhead, sep, fmt, skip) {
      const out = [];
      let size = overhead;
      for (const m of Object.keys(this.versions)) {
        if (skip && skip.has(m)) continue;
        const piece = fmt(m, this.versions[m]);
        const add = piece.length + (out.length ? sep : 0);
        if (size + add > limit) continue;
        size += add;
        out.push([m, this.versions[m]]);
      }
      return out;
    }

    _frameSinceEntries() {
      // {"type":"begin","since":{...}} ; ids are ASCII so length == bytes.
      const fromMs = this.fromMs === null ? '' : ',"from_ms":' + this.fromMs;
      const overhead = '{"type":"begin","since":{}}'.length + fromMs.length;
      return this._sinceEntries(MAX_CLIENT_FRAME, overhead, 1, (m, v) => JSON.stringify(m) + ':' + v);
    }

    _beginFrame() {
      const entries = this._frameSinceEntries();
      const frame = { type: 'begin' };
      if (entries.length) {
        const since = {};
        for (const [m, v] of entries) since[m] = v;
        frame.since = since;
      }
      if (this.fromMs !== null) frame.from_ms = this.fromMs;
      return JSON.stringify(frame);
    }

    _sinceQuery(skip) {
      const entries = this._sinceEntries(MAX_SINCE_QUERY, 0, 1, (m, v) => encId(m) + '@' + v, skip);
      return entries.map(([m, v]) => encId(m) + '@' + v).join(',');
    }

    // The server defers a begin that follows the previous one on the same
    // connection within 500 ms, so a begin asked for too soon is deferred
    // (several such requests make one begin).
    _sendBegin() {
      if (this.transport === 'ws') {
        const ws = this._ws;
        if (!ws || !this._subscribedConn) return false;
        if (this._beginTimer !== null) return true; // one is already pending
        const now = this._now();
        const wait = this._lastBeginAt === null ? 0 : this._lastBeginAt + this.beginMinIntervalMs - now;
        if (wait > 0) {
          this._beginTimer = this._setTimeout(() => {
            this._beginTimer = null;
            if (this._ws === ws && this._subscribedConn) this._sendBegin();
          }, wait);
          return true;
        }
        try {
          ws.send(this._beginFrame());
          this._lastBeginAt = now;
          return true;
        } catch (e) {
          this._error(new StreamPipeError('network', 'begin not sent: ' + (e && e.message), { cause: e }), false);
          return false;
        }
      }
      if (!this.channel || !this._es) return false;
      this._api('POST', '/v1/channels/' + encId(this.channel) + '/begin').catch((e) => this._error(e, false));
      return true;
    }

    // ---- control API --------------------------------------------------
    async _api(method, path, body, extra) {
      if (!this._fetch) throw new StreamPipeError('config', 'StreamPipe: no fetch implementation');
      const init = { method: method, headers: { accept: 'application/json' } };
      const token = await this._token(false);
      if (token) init.headers.authorization = 'Bearer ' + token;
      if (body !== undefined) {
        init.headers['content-type'] = 'application/json';
        init.body = JSON.stringify(body);
      }
      if (extra) Object.assign(init, extra);
      let resp;
      try {
        resp = await this._fetch(this.baseUrl + path, init);
      } catch (e) {
        throw new StreamPipeError('network', method + ' ' + path + ': ' + (e && e.message), { transient: true, cause: e });
      }
      let data = null;
      if (resp.status !== 204 && typeof resp.text === 'function') {
        let text = '';
        try {
          text = await resp.text();
        } catch (e) {
          text = '';
        }
        if (text) {
          try {
            data = JSON.parse(text);
          } catch (e) {
            data = null;
          }
        }
      }
      const ok = resp.ok !== undefined ? resp.ok : resp.status >= 200 && resp.status < 300;
      if (!ok) {
        const s = resp.status;
        if (s === 401 && this._getToken) this._tokenValue = null;
        const apiErr = data && data.error ? data.error : {};
        throw new StreamPipeError(apiErr.code || 'http_' + s, method + ' ' + path + ': ' + (apiErr.message || 'HTTP ' + s), {
          status: s,
          // 401 with getToken: the token is fetched anew and retried.
          transient: s >= 500 || s === 408 || s === 429 || (s === 401 && !!this._getToken),
        });
      }
      return data;
    }

    async addMarkets(list) {
      const add = uniqStrings(list);
      if (!add.length) return this.markets.slice();
      for (const m of add) this._removed.delete(m);
      if (this._creating) {
        try {
          await this._creating;
        } catch (e) {
          /* fall through: no channel yet */
        }
      }
      if (!this.channel) {
        this.markets = uniqStrings(this.markets.concat(add));
        return this.markets.slice();
      }
      let res;
      try {
        res = await this._api('POST', '/v1/channels/' + encId(this.channel) + '/markets', { markets: add });
      } catch (e) {
        // The channel is gone: keep the markets so the next channel has them.
        if (e.status === 404 && e.code === 'unknown_channel') this.markets = uniqStrings(this.markets.concat(add));
        throw e;
      }
      this.markets = res && Array.isArray(res.markets) ? uniqStrings(res.markets) : uniqStrings(this.markets.concat(add));
      // Subscribing does not publish state: ask for it (since skips the rest).
      this._sendBegin();
      return this.markets.slice();
    }

    async _postQuery(query) {
      const res = await this._api('POST', '/v1/channels/' + encId(this.channel) + '/queries', { query });
      if (res && Array.isArray(res.queries)) this.queries = uniqStrings(res.queries);
      return this.queries.slice();
    }

    async addQuery(query) {
      if (typeof query !== 'string' || !query) throw new StreamPipeError('invalid_query', 'addQuery: query required');
      if (this._creating) {
        try {
          await this._creating;
        } catch (e) {
          /* no channel yet */
        }
      }
      if (!this.channel) {
        // Added when the channel is created.
        this.queries = uniqStrings(this.queries.concat([query]));
        return this.queries.slice();
      }
      return this._postQuery(query);
    }

    async removeQuery(query) {
      if (typeof query !== 'string' || !query) throw new StreamPipeError('invalid_query', 'removeQuery: query required');
      this.queries = this.queries.filter((q) => q !== query);
      if (this._creating) {
        try {
          await this._creating;
        } catch (e) {
          /* no channel */
        }
      }
      if (!this.channel) return;
      try {
        await this._api('DELETE', '/v1/channels/' + encId(this.channel) + '/queries?query=' + encodeURIComponent(query));
      } catch (e) {
        if (e.status === 404 && e.code === 'unknown_query') return;
        throw e;
      }
    }

    async removeMarket(market) {
      if (typeof market !== 'string' || !market) throw new StreamPipeError('invalid_market', 'removeMarket: market id required');
      this._removed.add(market);
      this.markets = this.markets.filter((m) => m !== market);
      delete this.versions[market];
      delete this.state[market];
      if (this._creating) {
        try {
          await this._creating;
        } catch (e) {
          /* no channel */
        }
      }
      if (!this.channel) return;
      try {
        await this._api('DELETE', '/v1/channels/' + encId(this.channel) + '/markets/' + encId(market));
      } catch (e) {
        if (e.status === 404 && e.code === 'unknown_market') return;
        throw e;
      }
    }

    // ---- rate ---------------------------------------------------------
    _countRate(now) {
      const sec = Math.floor(now / 1000);
      const b = this._buckets;
      const last = b[b.length - 1];
      if (last && last[0] === sec) last[1]++;
      else {
        b.push([sec, 1]);
        if (b.length > 120) b.shift();
      }
    }

    rate(windowMs) {
      const n = Math.max(1, Math.round((windowMs || 5000) / 1000));
      const cur = Math.floor(this._now() / 1000);
      const span = Math.max(1, Math.min(n, cur - this._startSec));
      let count = 0;
      for (const [s, c] of this._buckets) if (s >= cur - span && s < cur) count += c;
      return count / span;
    }

    _ensureRateTimer() {
      if (!this._started || this._rateTimer !== null) return;
      if (!this._listeners.rate || !this._listeners.rate.length) return;
      const tick = () => {
        this._rateTimer = null;
        if (!this._started) return;
        this._emit('rate', { perSecond: this.rate() });
        this._ensureRateTimer();
      };
      this._rateTimer = this._setTimeout(tick, 1000);
      if (this._rateTimer && typeof this._rateTimer.unref === 'function') this._rateTimer.unref();
    }
  }

  // The base URL a page may take from a `?base=` parameter: only its own
  // origin (optionally with a path prefix, for a publisher behind a
  // path-routing proxy). A link must not point the page at a server of the
  // link author's choosing; anything else falls back to the page's origin.
  StreamPipe.sameOriginBase = function (param, pageHref) {
    const page = new URL(pageHref);
    if (!param) return page.origin;
    let u;
    try {
      u = new URL(param, page.href);
    } catch (e) {
      return page.origin;
    }
    if (u.origin !== page.origin) return page.origin;
    return (u.origin + u.pathname).replace(/\/+$/, '');
  };
  StreamPipe.Error = StreamPipeError;
  StreamPipe.version = '2';
  return StreamPipe;
});

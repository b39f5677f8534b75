-- wrk script for bench/bench_gateway.py: POST a chat request with an exact, verifiable count.
--
-- Usage: wrk -t1 -cN -d<cap> --timeout 10s URL -s chat.lua -- BODY_FILE MODE VALUE [FILLER_PATH]
--   MODE "limit":   send exactly VALUE chat requests, then stop once every one has answered.
--   MODE "seconds": send chat requests for about VALUE seconds, then stop once all have answered.
--
-- Why the filler: wrk has no "stop after N" and cuts in-flight requests at -d, so the number of
-- requests the proxy saw (and must have logged) would be unknown by up to -c.  Instead, once the
-- chat quota is sent each connection sends cheap GET FILLER_PATH requests (never proxied, never
-- logged) until the last chat answer is in, and then the thread stops itself.  The chat count is
-- therefore exact: chat_sent == chat_ok + chat_fail.  Fillers are counted and reported; they are
-- a handful of fast requests at the very end of the run.

local ffi = require("ffi")
ffi.cdef([[
  typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
  int clock_gettime(int clk_id, bench_timespec *tp);
]])
local ts = ffi.new("bench_timespec")
local function now_us()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000000 + tonumber(ts.tv_nsec) / 1000
end

-- Globals (not locals) so that done() can read them from the thread with thread:get().
chat_sent, chat_ok, chat_fail, fillers = 0, 0, 0, 0
first_us, last_us = 0, 0
local chat_req, filler_req, mode, value
local draining, verified, stopped = false, false, false
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  local f = assert(io.open(args[1], "rb"))
  local body = f:read("*a")
  f:close()
  mode, value = args[2], tonumber(args[3])
  local headers = {}
  headers["Content-Type"] = "application/json"
  headers["Authorization"] = "Bearer x"
  chat_req = wrk.format("POST", nil, headers, body)
  filler_req = wrk.format("GET", args[4] or "/healthz")
end

local function check_drain()
  if draining then return end
  if mode == "limit" then
    draining = chat_sent >= value
  else
    draining = now_us() - first_us >= value * 1000000
  end
end

function request()
  if not verified then
    -- wrk calls request() once before the run to check the script (script_verify_request);
    -- that request is never sent, so it must not count.
    verified = true
    return chat_req
  end
  if first_us == 0 then first_us = now_us() end
  check_drain()
  if draining then
    fillers = fillers + 1
    return filler_req
  end
  chat_sent = chat_sent + 1
  return chat_req
end

function response(status, headers, body)
  if status == 200 and body ~= nil and string.find(body, "chat.completion", 1, true) then
    chat_ok = chat_ok + 1
    last_us = now_us()
  elseif status >= 400 and status ~= 404 and status ~= 405 then
    chat_fail = chat_fail + 1 -- a filler answers 200/404/405; anything else is a failed chat
    last_us = now_us()
  end
  check_drain()
  if draining and chat_ok + chat_fail >= chat_sent then
    if not stopped then
      stopped = true
      -- wrk's main thread sleeps for the whole -d regardless; the harness reads this line and
      -- sends SIGINT, which ends the sleep and prints the summary at once.
      io.write("BENCH_STOPPED\n")
      io.flush()
    end
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local sent, ok, fail, fill, t0, t1 = 0, 0, 0, 0, nil, 0
  for _, t in ipairs(threads) do
    local f, l = t:get("first_us"), t:get("last_us")
    if f > 0 and (t0 == nil or f < t0) then t0 = f end
    if l > t1 then t1 = l end
    sent = sent + t:get("chat_sent")
    ok = ok + t:get("chat_ok")
    fail = fail + t:get("chat_fail")
    fill = fill + t:get("fillers")
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"chat_us":%d,"duration_us":%d,"requests":%d,"bytes":%d,"chat_sent":%d,"chat_ok":%d,' ..
    '"chat_fail":%d,"fillers":%d,"err_connect":%d,"err_read":%d,"err_write":%d,' ..
    '"err_status":%d,"err_timeout":%d,"lat_mean_us":%.1f,"lat_p50_us":%d,"lat_p90_us":%d,' ..
    '"lat_p99_us":%d,"lat_p999_us":%d,"lat_max_us":%d}\n',
    (t0 and t1 > t0) and (t1 - t0) or 0, summary.duration, summary.requests, summary.bytes, sent, ok, fail, fill,
    e.connect, e.read, e.write, e.status, e.timeout, latency.mean,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max))
end

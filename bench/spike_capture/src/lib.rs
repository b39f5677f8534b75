//! Issue 15 spike: bench/spike_hyper's relay (hyper 1 server + hyper-util pooled client on one
//! current-thread tokio runtime, on an OS thread of its own) as a Python extension that records,
//! for every finished request, the facts llmtap's `Capture` holds and hands them to Python in
//! batches. No Python code runs per request: Python is woken once per batch.
//!
//! Relaying rules are the gateway's (`llmtap.gateway.proxy`): `/openai/<rest>` and
//! `/anthropic/<rest>` go to `<base><rest>`; hop-by-hop headers, `Host`, `Content-Length`,
//! `Expect` and `Llmtap-*` are not forwarded (the `Llmtap-*` ones are kept for the capture);
//! the answer gets `Llmtap-Request-Id`; bodies are relayed chunk by chunk as they arrive. The
//! OpenAI stream-usage rewrite is done here too, as byte tests (see `inject_stream_usage` and
//! `Stripper`), so the wire traffic is the one `llmtap up` produces.
//!
//! Hand-over: the relay thread appends a finished capture to a `Vec` under a mutex; only when
//! that `Vec` goes from empty to non-empty does it wake the consumer, either by one byte on a
//! socketpair whose other end the asyncio loop watches (`fileno()` + `drain()`, wake="fd") or
//! by a condvar that `next_batch()` waits on with the GIL released (wake="thread").

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::IntoPyObjectExt;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};
use tokio::sync::oneshot;

type RBody = BoxBody<Bytes, hyper::Error>;

/// `llmtap.gateway.headers.REQUEST_DROP` (hop-by-hop, host, content-length, expect).
const REQUEST_DROP: [&str; 12] = [
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "transfer-encoding", "upgrade", "host", "content-length", "expect",
];
/// `RESPONSE_DROP` (hop-by-hop).
const RESPONSE_DROP: [&str; 9] = [
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "transfer-encoding", "upgrade",
];
/// `llmtap.gateway.capture.TAIL_BYTES`.
const TAIL_BYTES: usize = 64 * 1024;
const REQUEST_ID: &str = "llmtap-request-id";

// -- ids -----------------------------------------------------------------------------------------

thread_local! {
    static RNG: std::cell::Cell<u64> = std::cell::Cell::new(seed());
}

fn seed() -> u64 {
    let mut buf = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut buf);
    }
    u64::from_le_bytes(buf) ^ (SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64)
}

/// splitmix64: fast, not a CSPRNG (a spike; llmtap's ids come from pooled os.urandom reads).
fn rand64() -> u64 {
    RNG.with(|c| {
        let mut z = c.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        c.set(z);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

/// A version 7 UUID string (48-bit Unix milliseconds, then random bits), as `llmtap.ids.new_id`.
fn new_id() -> String {
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    let hi = (ms << 16) | 0x7000 | (rand64() & 0x0fff);
    let lo = (rand64() & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        hi >> 32,
        (hi >> 16) & 0xffff,
        hi & 0xffff,
        lo >> 48,
        lo & 0xffff_ffff_ffff
    )
}

/// A client's `Llmtap-Request-Id` if it is a UUID (any case, with dashes), lowercased.
fn parse_id(v: &HeaderValue) -> Option<String> {
    let s = v.to_str().ok()?.trim();
    let b = s.as_bytes();
    if b.len() != 36 {
        return None;
    }
    for (i, c) in b.iter().enumerate() {
        let dash = matches!(i, 8 | 13 | 18 | 23);
        if dash != (*c == b'-') || (!dash && !c.is_ascii_hexdigit()) {
            return None;
        }
    }
    Some(s.to_ascii_lowercase())
}

// -- bytes helpers -----------------------------------------------------------------------------

fn find(h: &[u8], n: &[u8], from: usize) -> Option<usize> {
    if from > h.len() || n.len() > h.len() - from {
        return None;
    }
    h[from..].windows(n.len()).position(|w| w == n).map(|p| p + from)
}

fn rfind(h: &[u8], n: &[u8], upto: usize) -> Option<usize> {
    let h = &h[..upto.min(h.len())];
    if n.len() > h.len() {
        return None;
    }
    h.windows(n.len()).rposition(|w| w == n)
}

// -- the OpenAI stream-usage rewrite (byte tests; llmtap parses the request with orjson) -------

/// `"stream_options":{"include_usage":true}` added to a `"stream": true` request that has no
/// `stream_options`; None to send it unchanged. (llmtap also overrides an explicit false.)
fn inject_stream_usage(body: &[u8]) -> Option<Bytes> {
    if find(body, b"\"stream_options\"", 0).is_some() {
        return None;
    }
    let at = find(body, b"\"stream\"", 0)?;
    let mut i = at + 8;
    while i < body.len() && matches!(body[i], b' ' | b'\t' | b'\r' | b'\n' | b':') {
        i += 1;
    }
    if !body[i..].starts_with(b"true") {
        return None;
    }
    let open = body.iter().position(|c| !c.is_ascii_whitespace())?;
    if body[open] != b'{' {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() + 40);
    out.extend_from_slice(&body[..=open]);
    out.extend_from_slice(b"\"stream_options\":{\"include_usage\":true},");
    out.extend_from_slice(&body[open + 1..]);
    Some(Bytes::from(out))
}

/// `llmtap.providers.openai.UsageChunkStripper`: holds an incomplete event back, removes
/// `,"usage":null` and the usage-only chunk (`"choices":[]` with a `"usage":{`) from the rest.
struct Stripper {
    pending: Vec<u8>,
}

fn last_boundary(d: &[u8]) -> Option<usize> {
    if d.ends_with(b"\n\n") {
        return Some(d.len());
    }
    let a = rfind(d, b"\n\n", d.len()).map(|i| i + 2);
    let b = rfind(d, b"\r\n\r\n", d.len()).map(|i| i + 4);
    a.max(b)
}

/// (start, end) of the LF-delimited event holding `pos` (CRLF streams: a production TODO).
fn event_bounds(d: &[u8], pos: usize) -> (usize, usize) {
    let a = rfind(d, b"\n\n", pos).map(|i| i + 2).unwrap_or(0);
    let e = find(d, b"\n\n", pos).map(|i| i + 2).unwrap_or(d.len());
    (a, e)
}

fn clean(data: Bytes) -> Bytes {
    const NULL: &[u8] = b",\"usage\":null";
    const EMPTY: &[u8] = b"\"choices\":[]";
    if find(&data, NULL, 0).is_none() && find(&data, EMPTY, 0).is_none() {
        return data;
    }
    let mut d: Vec<u8> = Vec::with_capacity(data.len());
    let mut pos = 0;
    while let Some(i) = find(&data, NULL, pos) {
        d.extend_from_slice(&data[pos..i]);
        pos = i + NULL.len();
    }
    d.extend_from_slice(&data[pos..]);
    let mut pos = find(&d, EMPTY, 0);
    while let Some(p) = pos {
        let (s, e) = event_bounds(&d, p);
        if find(&d[s..e], b"\"usage\":{", 0).is_some() {
            d.drain(s..e);
            pos = find(&d, EMPTY, s);
        } else {
            pos = find(&d, EMPTY, e);
        }
    }
    Bytes::from(d)
}

impl Stripper {
    fn feed(&mut self, chunk: &Bytes) -> Bytes {
        let data: Bytes = if self.pending.is_empty() {
            chunk.clone()
        } else {
            let mut v = std::mem::take(&mut self.pending);
            v.extend_from_slice(chunk);
            Bytes::from(v)
        };
        match last_boundary(&data) {
            None => {
                self.pending = data.to_vec();
                Bytes::new()
            }
            Some(end) => {
                if end < data.len() {
                    self.pending = data[end..].to_vec();
                }
                clean(data.slice(..end))
            }
        }
    }

    fn flush(&mut self) -> Bytes {
        let d = std::mem::take(&mut self.pending);
        if d.is_empty() {
            Bytes::new()
        } else {
            clean(Bytes::from(d))
        }
    }
}

// -- the capture ---------------------------------------------------------------------------------

/// What `llmtap.gateway.capture.Capture` holds, filled on the relay thread.
struct Cap {
    id: String,
    provider: &'static str,
    method: String,
    path: String,
    target: String,
    req_headers: HeaderMap,
    llmtap: Vec<(String, String)>,
    body: Bytes,
    body_size: usize,
    started: f64,
    t0: f64,
    t_headers: f64,
    t_first: f64,
    t_end: f64,
    status: Option<u16>,
    resp_headers: HeaderMap,
    chunks: Vec<Bytes>,
    response_size: usize,
    truncated: bool,
    tail: VecDeque<Bytes>,
    tail_size: usize,
    streamed: bool,
    outcome: &'static str,
    error: Option<String>,
    max: usize,
}

impl Cap {
    /// `Capture.add`: keep up to `max` bytes, then a bounded tail.
    fn add(&mut self, chunk: &Bytes) {
        let size = self.response_size;
        let n = chunk.len();
        self.response_size = size + n;
        if size + n <= self.max {
            self.chunks.push(chunk.clone());
            return;
        }
        let mut rest = chunk.clone();
        if size < self.max {
            self.chunks.push(chunk.slice(..self.max - size));
            rest = chunk.slice(self.max - size..);
        }
        self.truncated = true;
        self.tail_size += rest.len();
        self.tail.push_back(rest);
        while self.tail_size > TAIL_BYTES && self.tail.len() > 1 {
            let x = self.tail.pop_front().unwrap();
            self.tail_size -= x.len();
        }
    }
}

/// Finished captures on their way to Python.
struct Hub {
    q: Mutex<Vec<Cap>>,
    cv: Condvar,
    fd_mode: bool,
    tx: UnixStream,
    rx: UnixStream,
    pushed: AtomicU64,
    wakes: AtomicU64,
    batches: AtomicU64,
    clock: Instant,
}

impl Hub {
    fn now(&self) -> f64 {
        self.clock.elapsed().as_secs_f64()
    }

    fn push(&self, cap: Cap) {
        let first = {
            let mut q = self.q.lock().unwrap();
            q.push(cap);
            q.len() == 1
        };
        self.pushed.fetch_add(1, Ordering::Relaxed);
        if first {
            self.wakes.fetch_add(1, Ordering::Relaxed);
            if self.fd_mode {
                let _ = (&self.tx).write(&[1u8]);
            } else {
                self.cv.notify_one();
            }
        }
    }

    fn take(&self) -> Vec<Cap> {
        std::mem::take(&mut *self.q.lock().unwrap())
    }
}

// -- the relay -----------------------------------------------------------------------------------

struct State {
    client: Client<HttpConnector, Full<Bytes>>,
    openai: Option<String>,
    anthropic: Option<String>,
    hub: Arc<Hub>,
    max: usize,
    stream_usage: bool,
}

fn full(b: impl Into<Bytes>) -> RBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

fn json_error(status: StatusCode, kind: &str, message: &str, id: &str) -> (Response<RBody>, Bytes) {
    let mut msg = String::with_capacity(message.len() + 2);
    for ch in message.chars() {
        match ch {
            '"' => msg.push_str("\\\""),
            '\\' => msg.push_str("\\\\"),
            c if (c as u32) < 0x20 => msg.push(' '),
            c => msg.push(c),
        }
    }
    let body = Bytes::from(format!("{{\"error\":{{\"type\":\"{kind}\",\"message\":\"{msg}\"}}}}"));
    let mut resp = Response::new(full(body.clone()));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert("content-type", HeaderValue::from_static("application/json"));
    if let Ok(v) = HeaderValue::from_str(id) {
        h.insert(REQUEST_ID, v);
    }
    (resp, body)
}

fn header_str(v: &HeaderValue) -> String {
    match v.to_str() {
        Ok(s) => s.to_owned(),
        Err(_) => String::from_utf8_lossy(v.as_bytes()).into_owned(),
    }
}

async fn handle(req: Request<Incoming>, st: Arc<State>) -> Result<Response<RBody>, Infallible> {
    let hub = &st.hub;
    let t0 = hub.now();
    let started = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
    let raw = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/").to_owned();
    let slash = raw[1.min(raw.len())..].find('/').map(|i| i + 1);
    let route = slash.and_then(|s| match &raw[1..s] {
        "openai" => st.openai.as_deref().map(|b| ("openai", b)),
        "anthropic" => st.anthropic.as_deref().map(|b| ("anthropic", b)),
        _ => None,
    });
    let Some((provider, base)) = route else {
        if raw == "/healthz" {
            let mut r = Response::new(full(Bytes::from_static(b"{\"status\":\"ok\"}")));
            r.headers_mut().insert("content-type", HeaderValue::from_static("application/json"));
            return Ok(r);
        }
        let msg = format!("no route for {raw}: use /openai/..., /anthropic/...");
        return Ok(json_error(StatusCode::NOT_FOUND, "llmtap_not_found", &msg, &new_id()).0);
    };
    let rest = &raw[slash.unwrap()..];
    let path = rest.split('?').next().unwrap_or(rest).to_owned();
    let target = format!("{base}{rest}");

    let (parts, body) = req.into_parts();
    let mut forward = HeaderMap::with_capacity(parts.headers.len());
    let mut llmtap: Vec<(String, String)> = Vec::new();
    let mut request_id: Option<String> = None;
    for (name, value) in parts.headers.iter() {
        let n = name.as_str();
        if REQUEST_DROP.contains(&n) {
            continue;
        }
        if n.starts_with("llmtap-") {
            llmtap.push((n.to_owned(), header_str(value)));
            if n == REQUEST_ID {
                request_id = parse_id(value);
            }
            continue;
        }
        forward.append(name.clone(), value.clone());
    }
    let id = request_id.unwrap_or_else(new_id);
    let body = match body.collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => {
            return Ok(json_error(StatusCode::BAD_REQUEST, "llmtap_bad_request", "request body broke off", &id).0)
        }
    };
    let method = parts.method.as_str().to_owned();
    let mut upstream_body = body.clone();
    let mut stripper = None;
    if provider == "openai" && st.stream_usage && method == "POST" && path.ends_with("completions") {
        if let Some(b) = inject_stream_usage(&body) {
            upstream_body = b;
            stripper = Some(Stripper { pending: Vec::new() });
        }
    }
    let max = st.max;
    let mut cap = Cap {
        id,
        provider,
        method,
        path,
        target,
        req_headers: parts.headers.clone(),
        llmtap,
        body: if body.len() <= max { body.clone() } else { body.slice(..max) },
        body_size: body.len(),
        started,
        t0,
        t_headers: 0.0,
        t_first: 0.0,
        t_end: 0.0,
        status: None,
        resp_headers: HeaderMap::new(),
        chunks: Vec::new(),
        response_size: 0,
        truncated: false,
        tail: VecDeque::new(),
        tail_size: 0,
        streamed: false,
        outcome: "completed",
        error: None,
        max,
    };

    let mut up = Request::new(Full::new(upstream_body));
    *up.method_mut() = parts.method;
    *up.uri_mut() = match cap.target.parse() {
        Ok(u) => u,
        Err(_) => {
            return Ok(json_error(StatusCode::BAD_REQUEST, "llmtap_bad_request", "bad path", &cap.id).0);
        }
    };
    *up.headers_mut() = forward;
    match st.client.request(up).await {
        Err(e) => {
            let msg = format!("could not reach {base}: {e}");
            let (resp, body) = json_error(StatusCode::BAD_GATEWAY, "llmtap_upstream_unreachable", &msg, &cap.id);
            cap.status = Some(502);
            cap.resp_headers = resp.headers().clone();
            cap.add(&body);
            cap.t_end = hub.now();
            cap.outcome = "upstream_unreachable";
            cap.error = Some(msg);
            hub.push(cap);
            Ok(resp)
        }
        Ok(resp) => {
            cap.t_headers = hub.now();
            let (mut rp, rbody) = resp.into_parts();
            cap.status = Some(rp.status.as_u16());
            cap.resp_headers = rp.headers.clone();
            cap.streamed = rp
                .headers
                .get("content-type")
                .map(|v| v.as_bytes().starts_with(b"text/event-stream"))
                .unwrap_or(false);
            if !cap.streamed {
                stripper = None;
            }
            for h in RESPONSE_DROP {
                rp.headers.remove(h);
            }
            if stripper.is_some() {
                rp.headers.remove("content-length");
            }
            if let Ok(v) = HeaderValue::from_str(&cap.id) {
                rp.headers.insert(HeaderName::from_static(REQUEST_ID), v);
            }
            let body = CaptureBody { inner: rbody, cap: Some(Box::new(cap)), strip: stripper, hub: st.hub.clone(), done: false };
            Ok(Response::from_parts(rp, body.boxed()))
        }
    }
}

/// The upstream's body on its way to the client: each frame is kept in the capture (a refcount,
/// no copy), passed through the stripper if any, and the capture is pushed when the body ends
/// (completed), breaks (upstream_cut) or is dropped before its end (client_disconnected).
struct CaptureBody {
    inner: Incoming,
    cap: Option<Box<Cap>>,
    strip: Option<Stripper>,
    hub: Arc<Hub>,
    done: bool,
}

impl CaptureBody {
    fn finish(&mut self, outcome: &'static str, error: Option<String>) {
        if let Some(mut cap) = self.cap.take() {
            cap.t_end = self.hub.now();
            cap.outcome = outcome;
            cap.error = error;
            self.hub.push(*cap);
        }
    }
}

impl HttpBody for CaptureBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        loop {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        if let Some(cap) = this.cap.as_mut() {
                            if cap.t_first == 0.0 {
                                cap.t_first = this.hub.now();
                            }
                            cap.add(&data);
                        }
                        let out = match this.strip.as_mut() {
                            Some(s) => s.feed(&data),
                            None => data,
                        };
                        if this.strip.is_none() && this.inner.is_end_stream() {
                            // A body of known length: hyper may not poll again after its last byte.
                            this.finish("completed", None);
                            this.done = true;
                        }
                        if out.is_empty() {
                            continue;
                        }
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                Poll::Ready(Some(Err(e))) => {
                    this.finish("upstream_cut", Some(format!("upstream broke mid-response: {e}")));
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => {
                    let rest = this.strip.as_mut().map(|s| s.flush()).unwrap_or_default();
                    this.finish("completed", None);
                    this.done = true;
                    if !rest.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(rest))));
                    }
                    return Poll::Ready(None);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        if self.strip.is_some() {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

impl Drop for CaptureBody {
    fn drop(&mut self) {
        if self.cap.is_some() {
            if self.inner.is_end_stream() {
                self.finish("completed", None);
            } else {
                self.finish("client_disconnected", Some("client closed the connection mid-response".into()));
            }
        }
    }
}

// -- Python --------------------------------------------------------------------------------------

fn headers_py<'py>(py: Python<'py>, h: &HeaderMap) -> PyResult<Bound<'py, PyList>> {
    let list = PyList::empty(py);
    for (name, value) in h.iter() {
        let pair = PyTuple::new(py, [PyString::new(py, name.as_str()), PyString::new(py, &header_str(value))])?;
        list.append(pair)?;
    }
    Ok(list)
}

/// One capture as a tuple, in the order of `bench/spike_capture.py`'s `FIELDS`.
fn cap_py<'py>(py: Python<'py>, c: Cap) -> PyResult<Bound<'py, PyTuple>> {
    let llmtap: Py<PyAny> = if c.llmtap.is_empty() {
        py.None()
    } else {
        let l = PyList::empty(py);
        for (k, v) in &c.llmtap {
            l.append((k.as_str(), v.as_str()))?;
        }
        l.into_any().unbind()
    };
    let chunks = PyList::empty(py);
    for ch in &c.chunks {
        chunks.append(PyBytes::new(py, ch))?;
    }
    let tail: Py<PyAny> = if c.tail.is_empty() {
        py.None()
    } else {
        let l = PyList::empty(py);
        for ch in &c.tail {
            l.append(PyBytes::new(py, ch))?;
        }
        l.into_any().unbind()
    };
    let items: Vec<Py<PyAny>> = vec![
        c.id.into_py_any(py)?,
        c.provider.into_py_any(py)?,
        c.method.into_py_any(py)?,
        c.path.into_py_any(py)?,
        c.target.into_py_any(py)?,
        headers_py(py, &c.req_headers)?.into_any().unbind(),
        llmtap,
        PyBytes::new(py, &c.body).into_any().unbind(),
        c.body_size.into_py_any(py)?,
        c.started.into_py_any(py)?,
        c.t0.into_py_any(py)?,
        c.t_headers.into_py_any(py)?,
        c.t_first.into_py_any(py)?,
        c.t_end.into_py_any(py)?,
        c.status.into_py_any(py)?,
        headers_py(py, &c.resp_headers)?.into_any().unbind(),
        chunks.into_any().unbind(),
        c.response_size.into_py_any(py)?,
        c.truncated.into_py_any(py)?,
        tail,
        c.tail_size.into_py_any(py)?,
        c.streamed.into_py_any(py)?,
        c.outcome.into_py_any(py)?,
        c.error.into_py_any(py)?,
    ];
    PyTuple::new(py, items)
}

fn batch_py<'py>(py: Python<'py>, caps: Vec<Cap>) -> PyResult<Bound<'py, PyList>> {
    let out = PyList::empty(py);
    for c in caps {
        out.append(cap_py(py, c)?)?;
    }
    Ok(out)
}

/// The relay, listening once constructed; its tokio runtime runs on a thread of its own.
#[pyclass(module = "_spike_capture")]
struct Relay {
    hub: Arc<Hub>,
    port: u16,
    shutdown: Mutex<Option<oneshot::Sender<()>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

async fn serve(listener: tokio::net::TcpListener, st: Arc<State>, mut stop: oneshot::Receiver<()>) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = &mut stop => break,
        };
        let Ok((stream, _)) = accepted else { continue };
        let _ = stream.set_nodelay(true);
        let st = st.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(req, st.clone()));
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
    // Let answers in flight finish (a spike's drain: a fixed grace, no Connection: close).
    tokio::time::sleep(Duration::from_millis(200)).await;
}

#[pymethods]
impl Relay {
    #[new]
    #[pyo3(signature = (openai_base=None, anthropic_base=None, host="127.0.0.1", port=0, max_body_bytes=1048576, stream_usage=true, wake="fd"))]
    fn new(
        openai_base: Option<String>,
        anthropic_base: Option<String>,
        host: &str,
        port: u16,
        max_body_bytes: usize,
        stream_usage: bool,
        wake: &str,
    ) -> PyResult<Self> {
        let fd_mode = match wake {
            "fd" => true,
            "thread" => false,
            _ => return Err(PyRuntimeError::new_err("wake must be 'fd' or 'thread'")),
        };
        let (tx, rx) = UnixStream::pair().map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        tx.set_nonblocking(true).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        rx.set_nonblocking(true).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        let hub = Arc::new(Hub {
            q: Mutex::new(Vec::new()),
            cv: Condvar::new(),
            fd_mode,
            tx,
            rx,
            pushed: AtomicU64::new(0),
            wakes: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            clock: Instant::now(),
        });
        let std_listener = std::net::TcpListener::bind((host, port)).map_err(|e| PyRuntimeError::new_err(format!("bind {host}:{port}: {e}")))?;
        std_listener.set_nonblocking(true).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        let port = std_listener.local_addr().map_err(|e| PyRuntimeError::new_err(e.to_string()))?.port();
        let trim = |s: Option<String>| s.map(|b| b.trim_end_matches('/').to_owned());
        let (stop_tx, stop_rx) = oneshot::channel();
        let hub2 = hub.clone();
        let (openai, anthropic) = (trim(openai_base), trim(anthropic_base));
        let thread = std::thread::Builder::new()
            .name("spike-relay".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
                rt.block_on(async move {
                    let mut connector = HttpConnector::new();
                    connector.set_nodelay(true);
                    connector.set_connect_timeout(Some(Duration::from_secs(10)));
                    let client = Client::builder(TokioExecutor::new()).build(connector);
                    let st = Arc::new(State { client, openai, anthropic, hub: hub2, max: max_body_bytes, stream_usage });
                    let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
                    serve(listener, st, stop_rx).await;
                });
            })
            .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        Ok(Relay { hub, port, shutdown: Mutex::new(Some(stop_tx)), thread: Mutex::new(Some(thread)) })
    }

    #[getter]
    fn port(&self) -> u16 {
        self.port
    }

    /// The fd to watch (wake="fd"): readable when captures wait. Then call `drain()`.
    fn fileno(&self) -> i32 {
        self.hub.rx.as_raw_fd()
    }

    /// Every capture waiting, as a list of tuples (never blocks). Clears the wake-up fd first,
    /// so a capture pushed meanwhile wakes the loop again.
    fn drain<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let mut buf = [0u8; 64];
        while let Ok(n) = (&self.hub.rx).read(&mut buf) {
            if n < buf.len() {
                break;
            }
        }
        let caps = self.hub.take();
        if !caps.is_empty() {
            self.hub.batches.fetch_add(1, Ordering::Relaxed);
        }
        batch_py(py, caps)
    }

    /// Block (GIL released) until at least one capture waits or `timeout` seconds pass; then
    /// every capture waiting (wake="thread").
    fn next_batch<'py>(&self, py: Python<'py>, timeout: f64) -> PyResult<Bound<'py, PyList>> {
        let hub = self.hub.clone();
        let caps = py.detach(move || {
            let deadline = Instant::now() + Duration::from_secs_f64(timeout.max(0.0));
            let mut q = hub.q.lock().unwrap();
            while q.is_empty() {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                q = hub.cv.wait_timeout(q, deadline - now).unwrap().0;
            }
            std::mem::take(&mut *q)
        });
        if !caps.is_empty() {
            self.hub.batches.fetch_add(1, Ordering::Relaxed);
        }
        batch_py(py, caps)
    }

    /// (captures pushed, wake-ups sent, non-empty batches taken).
    fn stats(&self) -> (u64, u64, u64) {
        (
            self.hub.pushed.load(Ordering::Relaxed),
            self.hub.wakes.load(Ordering::Relaxed),
            self.hub.batches.load(Ordering::Relaxed),
        )
    }

    /// Stop listening, give answers in flight 200 ms, join the thread.
    fn close(&self, py: Python<'_>) {
        if let Some(tx) = self.shutdown.lock().unwrap().take() {
            let _ = tx.send(());
        }
        let t = self.thread.lock().unwrap().take();
        if let Some(t) = t {
            py.detach(move || {
                let _ = t.join();
            });
        }
        if !self.hub.fd_mode {
            self.hub.cv.notify_all();
        }
    }
}

#[pymodule]
fn _spike_capture(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Relay>()?;
    Ok(())
}

//! The passthrough of bench/passthrough.py with no Python: hyper's HTTP/1 server and pooled
//! client on one current-thread tokio runtime. Same routing (`/openai/<path>` -> upstream
//! `/<path>`), same hop-by-hop filter; bodies (streams included) relayed frame by frame.
//!
//!     spike_hyper --port 8790 --upstream http://127.0.0.1:9999

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::HeaderMap;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

type Body = BoxBody<Bytes, hyper::Error>;

const HOP: [&str; 8] = [
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "host",
];

fn strip(headers: &mut HeaderMap) {
    for h in HOP {
        headers.remove(h);
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let body = Full::new(Bytes::from_static(body.as_bytes())).map_err(|never| match never {}).boxed();
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp
}

async fn handle(
    req: Request<Incoming>,
    client: Client<HttpConnector, Incoming>,
    base: &'static str,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let Some(rest) = path.strip_prefix("/openai") else {
        return Ok(if path == "/healthz" { text(StatusCode::OK, "ok") } else { text(StatusCode::NOT_FOUND, "not found") });
    };
    if !rest.starts_with('/') {
        return Ok(text(StatusCode::NOT_FOUND, "not found"));
    }
    let uri = match format!("{base}{rest}").parse() {
        Ok(u) => u,
        Err(_) => return Ok(text(StatusCode::BAD_REQUEST, "bad path")),
    };
    let (mut parts, body) = req.into_parts();
    parts.uri = uri;
    strip(&mut parts.headers);
    match client.request(Request::from_parts(parts, body)).await {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            strip(&mut parts.headers);
            Ok(Response::from_parts(parts, body.boxed()))
        }
        Err(_) => Ok(text(StatusCode::BAD_GATEWAY, "upstream error")),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        let i = args.iter().position(|a| a == name).unwrap_or_else(|| panic!("{name} is required"));
        args[i + 1].clone()
    };
    let port: u16 = arg("--port").parse().expect("--port");
    let base: &'static str = Box::leak(arg("--upstream").trim_end_matches('/').to_string().into_boxed_str());
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new()).build(connector);
    let listener = TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        let client = client.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(req, client.clone(), base));
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

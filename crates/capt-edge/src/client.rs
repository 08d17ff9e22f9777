//! A minimal HTTP/1.1 client on hyper's connection API, for the load test and the tests. It
//! only talks to loopback addresses: the load generator must never reach another host.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

/// A response with its body read completely.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("refusing to connect to {0}: the client only talks to loopback addresses")]
    NotLoopback(SocketAddr),
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP error: {0}")]
    Http(#[from] hyper::Error),
    #[error("bad request: {0}")]
    Request(#[from] hyper::http::Error),
}

/// One keep-alive connection.
pub struct Client {
    addr: SocketAddr,
    sender: http1::SendRequest<Full<Bytes>>,
    auth: Option<String>,
    headers: Vec<(String, String)>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Result<Self, ClientError> {
        Self::connect_to(addr, false).await
    }

    /// [`Self::connect`]; a non-loopback `addr` only with `allow_remote`.
    pub async fn connect_to(addr: SocketAddr, allow_remote: bool) -> Result<Self, ClientError> {
        if !allow_remote && !addr.ip().is_loopback() {
            return Err(ClientError::NotLoopback(addr));
        }
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|source| ClientError::Connect { addr, source })?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Self {
            addr,
            sender,
            auth: None,
            headers: Vec::new(),
        })
    }

    /// Sends `Authorization: Bearer KEY` on every request.
    pub fn with_api_key(mut self, key: Option<String>) -> Self {
        self.auth = key;
        self
    }

    /// Sends this header on every request (e.g. `X-Request-Id`).
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    pub async fn get(&mut self, path: &str) -> Result<Reply, ClientError> {
        self.send("GET", path, None, Bytes::new()).await
    }

    pub async fn post(
        &mut self,
        path: &str,
        content_type: &str,
        body: impl Into<Bytes>,
    ) -> Result<Reply, ClientError> {
        self.send("POST", path, Some(content_type), body.into())
            .await
    }

    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Bytes,
    ) -> Result<Reply, ClientError> {
        self.sender.ready().await?;
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, self.addr.to_string());
        if let Some(ct) = content_type {
            req = req.header(hyper::header::CONTENT_TYPE, ct);
        }
        if let Some(key) = &self.auth {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {key}"));
        }
        for (k, v) in &self.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let resp = self.sender.send_request(req.body(Full::new(body))?).await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(Reply {
            status,
            headers,
            body,
        })
    }
}

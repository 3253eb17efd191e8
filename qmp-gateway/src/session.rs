//! One QMP client connection: greeting, capabilities negotiation, requests answered in order,
//! events once negotiated.
//!
//! A reader task turns bytes into messages ([`JsonStream`]) and queues them (a few at most: a
//! client that floods is held back by the socket, as QEMU's monitor suspends reading); the
//! session answers them one at a time, in order. Events arrive on a broadcast channel
//! subscribed at negotiation, so nothing from before it is sent. Before a reply is written,
//! every event already received is written first: the bus task broadcasts an event before it
//! completes the call whose return followed it on the bus, so `stop` shows `STOP` before
//! `{"return": {}}`, as QEMU does.
//!
//! Every write is bounded by [`SessionConfig::write_timeout`]: a client that stops reading is
//! disconnected rather than holding the session (and memory) forever.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use flotilla_schema::check::QmpError;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc};

use crate::request::{self, BadRequest, Request};
use crate::wire::{JsonError, JsonStream, Limits};
use crate::{qerror, reply};

/// What a session needs from the rest of the gateway.
pub trait Backend: Send + Sync + 'static {
    /// Runs a command of a negotiated client (anything but `qmp_capabilities`): checks its
    /// arguments and dispatches it. The value is the reply's `return`.
    fn execute(
        &self,
        name: &str,
        arguments: Option<Map<String, Value>>,
    ) -> impl Future<Output = Result<Value, QmpError>> + Send;

    /// A new subscription to the event lines (each a complete `...\r\n` line).
    fn subscribe(&self) -> broadcast::Receiver<Arc<str>>;
}

/// Per-session settings.
#[derive(Debug, Clone, Copy)]
pub struct SessionConfig {
    pub limits: Limits,
    /// How long one write may wait for the client to read.
    pub write_timeout: Duration,
    /// Parsed messages queued ahead of the one being answered.
    pub queue: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig { limits: Limits::DEFAULT, write_timeout: Duration::from_secs(30), queue: 8 }
    }
}

/// Why a session ended, other than the client closing it.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("writing to the client failed: {0}")]
    Write(#[source] std::io::Error),
    #[error("the client did not read its replies for {0:?}")]
    WriteTimeout(Duration),
}

/// The reading half: bytes to messages, queued for the session.
async fn read_messages<R: AsyncRead + Unpin>(
    mut reader: R,
    tx: mpsc::Sender<Result<Value, JsonError>>,
    limits: Limits,
) {
    let mut stream = JsonStream::new(limits);
    let mut buf = vec![0u8; 16 * 1024];
    let mut out = Vec::new();
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) => {
                tracing::debug!("client read failed: {e}");
                return;
            }
        };
        stream.feed(&buf[..n], &mut out);
        for item in out.drain(..) {
            if tx.send(item).await.is_err() {
                return;
            }
        }
    }
}

/// Checks `qmp_capabilities`' arguments as QEMU 7.2 does (`enable`: a list of `QMPCapability`;
/// this server offers none).
pub fn check_capabilities_arguments(arguments: Option<&Map<String, Value>>) -> Result<(), QmpError> {
    use flotilla_schema::check::ArgError;
    let Some(args) = arguments else { return Ok(()) };
    if let Some(extra) = args.keys().find(|k| k.as_str() != "enable") {
        return Err(ArgError::UnexpectedParameter { name: extra.clone() }.to_qmp());
    }
    let Some(enable) = args.get("enable") else { return Ok(()) };
    let Value::Array(caps) = enable else {
        return Err(ArgError::InvalidParameterType { name: "enable".into(), expected: "array" }.to_qmp());
    };
    for (i, cap) in caps.iter().enumerate() {
        let Value::String(cap) = cap else {
            return Err(ArgError::InvalidParameterType { name: format!("enable[{i}]"), expected: "string" }.to_qmp());
        };
        // QEMU 7.2 names the element 'null' here (its enum visitor gets no name for list
        // elements); the transcript `errors/capabilities-unknown.txt` records it so.
        if cap != "oob" {
            return Err(qerror::invalid_parameter_value("null", cap));
        }
    }
    if let Some(Value::String(cap)) = caps.first() {
        return Err(qerror::capability_not_available(cap));
    }
    Ok(())
}

struct Session<W, B> {
    writer: W,
    backend: Arc<B>,
    cfg: SessionConfig,
    events: Option<broadcast::Receiver<Arc<str>>>,
}

impl<W: AsyncWrite + Unpin, B: Backend> Session<W, B> {
    async fn write(&mut self, line: &str) -> Result<(), SessionError> {
        match tokio::time::timeout(self.cfg.write_timeout, self.writer.write_all(line.as_bytes())).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(SessionError::Write(e)),
            Err(_) => Err(SessionError::WriteTimeout(self.cfg.write_timeout)),
        }
    }

    /// Writes every event received so far.
    async fn flush_events(&mut self) -> Result<(), SessionError> {
        loop {
            let Some(rx) = self.events.as_mut() else { return Ok(()) };
            match rx.try_recv() {
                Ok(line) => self.write(&line).await?,
                Err(broadcast::error::TryRecvError::Lagged(n)) => {
                    tracing::warn!("a slow QMP client missed {n} events");
                }
                Err(_) => return Ok(()),
            }
        }
    }

    /// Answers one message; returns the reply and whether to close afterwards.
    async fn answer(&mut self, message: Result<Value, JsonError>) -> (String, bool) {
        let req = match message {
            Err(e) => return (reply::error(&qerror::json_parsing(e.0), None), false),
            Ok(v) => match request::validate(v) {
                Err(BadRequest { error, id }) => return (reply::error(&error, id.as_ref()), false),
                Ok(r) => r,
            },
        };
        let Request { execute, arguments, id } = req;
        let id = id.as_ref();
        if execute == "qmp_capabilities" {
            let result = check_capabilities_arguments(arguments.as_ref()).and_then(|()| {
                if self.events.is_some() {
                    Err(qerror::negotiation_done())
                } else {
                    self.events = Some(self.backend.subscribe());
                    Ok(json!({}))
                }
            });
            return match result {
                Ok(v) => (reply::success(&v, id), false),
                Err(e) => (reply::error(&e, id), false),
            };
        }
        if self.events.is_none() {
            return (reply::error(&qerror::negotiation_expected(&execute), id), false);
        }
        match self.backend.execute(&execute, arguments).await {
            Ok(v) => (reply::success(&v, id), execute == "quit"),
            Err(e) => (reply::error(&e, id), false),
        }
    }

    async fn run(&mut self, mut rx: mpsc::Receiver<Result<Value, JsonError>>) -> Result<(), SessionError> {
        self.write(&reply::greeting()).await?;
        loop {
            let message = match self.events.as_mut() {
                None => rx.recv().await,
                Some(events) => tokio::select! {
                    biased;
                    m = rx.recv() => m,
                    e = events.recv() => {
                        match e {
                            Ok(line) => self.write(&line).await?,
                            Err(broadcast::error::RecvError::Lagged(n)) => {
                                tracing::warn!("a slow QMP client missed {n} events");
                            }
                            Err(broadcast::error::RecvError::Closed) => self.events = None,
                        }
                        continue;
                    }
                },
            };
            let Some(message) = message else { return Ok(()) };
            let (line, close) = self.answer(message).await;
            self.flush_events().await?;
            self.write(&line).await?;
            if close {
                return Ok(());
            }
        }
    }
}

/// Serves one client until it disconnects, `quit` succeeds, or a write fails.
pub async fn serve<R, W, B>(reader: R, writer: W, backend: Arc<B>, cfg: SessionConfig) -> Result<(), SessionError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin,
    B: Backend,
{
    let (tx, rx) = mpsc::channel(cfg.queue.max(1));
    let reader_task = tokio::spawn(read_messages(reader, tx, cfg.limits));
    let mut session = Session { writer, backend, cfg, events: None };
    let result = session.run(rx).await;
    reader_task.abort();
    let _ = session.writer.shutdown().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio::io::{AsyncBufReadExt, BufReader, DuplexStream, ReadHalf, WriteHalf};

    /// A backend that answers from a closure and lets the test emit events.
    struct Fake {
        events: broadcast::Sender<Arc<str>>,
        calls: Mutex<Vec<String>>,
    }

    impl Backend for Fake {
        async fn execute(&self, name: &str, arguments: Option<Map<String, Value>>) -> Result<Value, QmpError> {
            self.calls.lock().unwrap().push(name.to_string());
            match name {
                "query-name" => Ok(json!({"name": "vm"})),
                "stop" => {
                    // The event is broadcast before the call completes, as the bus task does.
                    let _ = self.events.send(reply::event("STOP", &json!({}), 1, 2).into());
                    Ok(json!({}))
                }
                "quit" => Ok(json!({})),
                "echo" => Ok(Value::Object(arguments.unwrap_or_default())),
                _ => Err(qerror::command_not_found(name)),
            }
        }

        fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
            self.events.subscribe()
        }
    }

    struct Client {
        r: BufReader<ReadHalf<DuplexStream>>,
        w: WriteHalf<DuplexStream>,
        backend: Arc<Fake>,
        task: tokio::task::JoinHandle<Result<(), SessionError>>,
    }

    impl Client {
        async fn start() -> Client {
            let (ours, theirs) = tokio::io::duplex(1 << 16);
            let (r, w) = tokio::io::split(theirs);
            let (events, _) = broadcast::channel(64);
            let backend = Arc::new(Fake { events, calls: Mutex::new(Vec::new()) });
            let task = tokio::spawn(serve(r, w, backend.clone(), SessionConfig::default()));
            let (r, w) = tokio::io::split(ours);
            let mut c = Client { r: BufReader::new(r), w, backend, task };
            let g = c.next().await.unwrap();
            assert_eq!(g["QMP"]["version"]["qemu"], json!({"major": 1, "minor": 1, "micro": 0}));
            c
        }

        async fn send(&mut self, s: &str) {
            self.w.write_all(s.as_bytes()).await.unwrap();
        }

        async fn next(&mut self) -> Option<Value> {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(5), self.r.read_line(&mut line)).await.unwrap().unwrap();
            if n == 0 {
                return None;
            }
            assert!(line.ends_with("\r\n"), "{line:?}");
            Some(serde_json::from_str(&line).unwrap())
        }

        async fn cmd(&mut self, s: &str) -> Value {
            self.send(s).await;
            self.send("\n").await;
            self.next().await.unwrap()
        }

        async fn negotiate(&mut self) {
            assert_eq!(self.cmd(r#"{"execute": "qmp_capabilities"}"#).await, json!({"return": {}}));
        }
    }

    fn class(v: &Value) -> &str {
        v["error"]["class"].as_str().unwrap_or_else(|| panic!("not an error: {v}"))
    }

    #[tokio::test]
    async fn negotiation() {
        let mut c = Client::start().await;
        let r = c.cmd(r#"{"execute": "query-name", "id": 1}"#).await;
        assert_eq!(class(&r), "CommandNotFound");
        assert_eq!(r["error"]["desc"], "Expecting capabilities negotiation with 'qmp_capabilities'");
        assert_eq!(r["error"]["data"], json!({"name": "query-name"}));
        assert_eq!(r["id"], 1);
        // Unknown commands too, and nothing reached the backend.
        assert_eq!(class(&c.cmd(r#"{"execute": "nosuch"}"#).await), "CommandNotFound");
        assert!(c.backend.calls.lock().unwrap().is_empty());
        // Envelope errors are still envelope errors.
        assert_eq!(class(&c.cmd("[]").await), "QMPBadInputObject");
        // Unknown capability, offered-nowhere capability, bad argument.
        let r = c.cmd(r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["nosuchcap"]}}"#).await;
        assert_eq!(r["error"]["desc"], "Parameter 'null' does not accept value 'nosuchcap'");
        let r = c.cmd(r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}"#).await;
        assert_eq!(r["error"]["desc"], "Capability 'oob' not available");
        let r = c.cmd(r#"{"execute": "qmp_capabilities", "arguments": {"foo": 1}}"#).await;
        assert_eq!(r["error"]["desc"], "Parameter 'foo' is unexpected");
        let r = c.cmd(r#"{"execute": "qmp_capabilities", "arguments": {"enable": "oob"}}"#).await;
        assert_eq!(r["error"]["desc"], "Invalid parameter type for 'enable', expected: array");
        // Events before negotiation are not sent (nor queued).
        let _ = c.backend.events.send(reply::event("RESET", &json!({}), 0, 0).into());
        let r = c.cmd(r#"{"execute": "qmp_capabilities", "arguments": {"enable": []}, "id": "n"}"#).await;
        assert_eq!(r, json!({"return": {}, "id": "n"}));
        assert_eq!(c.cmd(r#"{"execute": "query-name"}"#).await, json!({"return": {"name": "vm"}}));
        let r = c.cmd(r#"{"execute": "qmp_capabilities"}"#).await;
        assert_eq!(class(&r), "CommandNotFound");
        assert_eq!(r["error"]["desc"], "Capabilities negotiation is already complete, command ignored");
    }

    #[tokio::test]
    async fn event_before_its_reply_and_idle_events() {
        let mut c = Client::start().await;
        c.negotiate().await;
        c.send("{\"execute\": \"stop\", \"id\": 5}\n").await;
        let ev = c.next().await.unwrap();
        assert_eq!(ev["event"], "STOP");
        assert_eq!(ev["timestamp"], json!({"seconds": 1, "microseconds": 2}));
        assert_eq!(c.next().await.unwrap(), json!({"return": {}, "id": 5}));
        // An event while idle is written at once.
        let _ = c.backend.events.send(reply::event("POWERDOWN", &json!({}), 3, 4).into());
        assert_eq!(c.next().await.unwrap()["event"], "POWERDOWN");
    }

    #[tokio::test]
    async fn pipelined_requests_in_order_with_ids() {
        let mut c = Client::start().await;
        c.negotiate().await;
        let mut batch = String::new();
        for i in 0..50 {
            batch.push_str(&format!("{{\"execute\": \"echo\", \"arguments\": {{\"n\": {i}}}, \"id\": [{i}]}}"));
        }
        c.send(&batch).await;
        for i in 0..50 {
            assert_eq!(c.next().await.unwrap(), json!({"return": {"n": i}, "id": [i]}));
        }
    }

    #[tokio::test]
    async fn malformed_input_answered_and_stream_recovers() {
        let mut c = Client::start().await;
        c.negotiate().await;
        c.send("{\"execute\": query-status}\n").await;
        let a = c.next().await.unwrap();
        let b = c.next().await.unwrap();
        assert_eq!(a, json!({"error": {"class": "JSONParsing", "desc": "JSON parse error, stray '-s'", "data": {}}}));
        assert_eq!(b["error"]["desc"], "JSON parse error, expecting value");
        assert_eq!(c.cmd(r#"{"execute": "query-name", "id": "after"}"#).await["id"], "after");
        let r = c.cmd(r#"{"execute": "query-name", "foo": 1, "id": 9}"#).await;
        assert_eq!((class(&r), &r["id"]), ("QMPExtraInputObjectMember", &json!(9)));
    }

    #[tokio::test]
    async fn quit_closes_the_connection() {
        let mut c = Client::start().await;
        c.negotiate().await;
        assert_eq!(c.cmd(r#"{"execute": "quit"}"#).await, json!({"return": {}}));
        assert_eq!(c.next().await, None);
        c.task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn eof_ends_the_session_after_queued_requests() {
        let mut c = Client::start().await;
        c.send("{\"execute\": \"qmp_capabilities\"}{\"execute\": \"query-name\"}").await;
        c.w.shutdown().await.unwrap();
        assert_eq!(c.next().await.unwrap(), json!({"return": {}}));
        assert_eq!(c.next().await.unwrap(), json!({"return": {"name": "vm"}}));
        assert_eq!(c.next().await, None);
    }

    #[tokio::test]
    async fn a_client_that_never_reads_is_dropped() {
        let (_ours, theirs) = tokio::io::duplex(64);
        let (r, w) = tokio::io::split(theirs);
        let (events, _) = broadcast::channel(64);
        let backend = Arc::new(Fake { events, calls: Mutex::new(Vec::new()) });
        let cfg = SessionConfig { write_timeout: Duration::from_millis(100), ..SessionConfig::default() };
        let res = tokio::time::timeout(Duration::from_secs(5), serve(r, w, backend, cfg)).await.unwrap();
        assert!(matches!(res, Err(SessionError::WriteTimeout(_))), "{res:?}");
    }
}

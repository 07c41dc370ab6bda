//! A real browser for the console's tests: Debian's headless Chromium, driven over the
//! Chrome DevTools Protocol (JSON over a WebSocket). Input goes in as the browser's own
//! mouse and key events, as a person's would; conditions are polled until they hold
//! (never a fixed sleep); what the page logs as an error is kept for the test to check.

use std::{
    collections::HashMap,
    path::Path,
    process::Stdio,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::{anyhow, bail, Context};
use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;

/// How long a condition may take to hold.
const WAIT: Duration = Duration::from_secs(30);

/// The browsers tried, in order: the headless build first (no display libraries). The
/// binaries themselves, not Debian's /usr/bin wrapper scripts, which do not `exec`.
const CANDIDATES: &[&str] = &[
    "/usr/lib/chromium/chromium-headless-shell",
    "/usr/lib/chromium/chromium",
];

type Sink = futures_util::stream::SplitSink<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    Message,
>;
type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

/// A headless Chromium with one page; killed when dropped.
#[derive(Debug)]
pub struct Browser {
    process: tokio::process::Child,
    _profile: tempfile::TempDir,
    sink: tokio::sync::Mutex<Sink>,
    pending: Pending,
    next_id: AtomicU64,
    session: String,
    errors: Arc<Mutex<Vec<String>>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.reader.abort();
        // The browser and every process it started (zygote, renderers, GPU) share its
        // process group.
        if let Some(pid) = self.process.id() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Browser {
    /// Starts the browser with a fresh profile and opens a blank page of
    /// `width`×`height` CSS pixels.
    pub async fn launch(width: u32, height: u32) -> anyhow::Result<Browser> {
        let binary = CANDIDATES
            .iter()
            .find(|path| Path::new(path).exists())
            .ok_or_else(|| {
                anyhow!("no Chromium found ({CANDIDATES:?}); scripts/setup.sh installs it")
            })?;
        let profile = tempfile::tempdir()?;
        let mut command = tokio::process::Command::new(binary);
        command
            .args([
                "--headless",
                // The tests run as root, where Chromium's sandbox cannot start.
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                "--remote-debugging-port=0",
                &format!("--window-size={width},{height}"),
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true);
        let mut process = command
            .spawn()
            .with_context(|| format!("starting {binary}"))?;
        // Chromium writes its DevTools port and path here once it listens.
        let port_file = profile.path().join("DevToolsActivePort");
        let endpoint = tokio::time::timeout(WAIT, async {
            loop {
                if let Ok(text) = std::fs::read_to_string(&port_file) {
                    let mut lines = text.lines();
                    if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                        return Ok(format!("ws://127.0.0.1:{port}{path}"));
                    }
                }
                if let Some(status) = process.try_wait()? {
                    bail!("{binary} exited ({status}) before it listened");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .map_err(|_| anyhow!("{binary} did not open its DevTools port within {WAIT:?}"))??;

        let (socket, _) = tokio_tungstenite::connect_async(&endpoint).await?;
        let (sink, mut stream) = socket.split();
        let pending: Pending = Arc::default();
        let errors: Arc<Mutex<Vec<String>>> = Arc::default();
        let reader = tokio::spawn({
            let pending = pending.clone();
            let errors = errors.clone();
            async move {
                while let Some(Ok(message)) = stream.next().await {
                    let Message::Text(text) = message else {
                        continue;
                    };
                    let Ok(value) = serde_json::from_str::<Value>(&text) else {
                        continue;
                    };
                    if let Some(id) = value.get("id").and_then(Value::as_u64) {
                        let waiting = pending
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&id);
                        if let Some(waiting) = waiting {
                            let _ = waiting.send(value);
                        }
                    } else if let Some(error) = page_error(&value) {
                        errors.lock().unwrap_or_else(|e| e.into_inner()).push(error);
                    }
                }
            }
        });
        let mut browser = Browser {
            process,
            _profile: profile,
            sink: tokio::sync::Mutex::new(sink),
            pending,
            next_id: AtomicU64::new(1),
            session: String::new(),
            errors,
            reader,
        };
        let target = browser
            .send(None, "Target.createTarget", json!({ "url": "about:blank" }))
            .await?;
        let attached = browser
            .send(
                None,
                "Target.attachToTarget",
                json!({ "targetId": target["targetId"], "flatten": true }),
            )
            .await?;
        browser.session = attached["sessionId"]
            .as_str()
            .ok_or_else(|| anyhow!("no session in {attached}"))?
            .to_string();
        for domain in ["Page.enable", "Runtime.enable", "Log.enable"] {
            browser.call(domain, json!({})).await?;
        }
        browser.viewport(width, height, false).await?;
        Ok(browser)
    }

    async fn send(
        &self,
        session: Option<&str>,
        method: &str,
        params: Value,
    ) -> anyhow::Result<Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut message = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            message["sessionId"] = json!(session);
        }
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        self.sink
            .lock()
            .await
            .send(Message::text(message.to_string()))
            .await?;
        let answer = tokio::time::timeout(WAIT, rx)
            .await
            .map_err(|_| anyhow!("the browser did not answer {method} within {WAIT:?}"))??;
        if let Some(error) = answer.get("error") {
            bail!("{method}: {error}");
        }
        Ok(answer["result"].clone())
    }

    /// Calls a DevTools method on the page.
    pub async fn call(&self, method: &str, params: Value) -> anyhow::Result<Value> {
        let session = self.session.clone();
        self.send(Some(&session), method, params).await
    }

    /// Sizes the page as a screen `width`×`height` CSS pixels (`mobile`: a phone's).
    pub async fn viewport(&self, width: u32, height: u32, mobile: bool) -> anyhow::Result<()> {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile }),
        )
        .await?;
        Ok(())
    }

    /// Loads `url` and waits until the document is complete.
    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.call("Page.navigate", json!({ "url": url })).await?;
        self.wait_until(
            &format!("{url} loaded"),
            &format!(
                "document.readyState === 'complete' && location.href.startsWith({})",
                json!(url)
            ),
        )
        .await?;
        Ok(())
    }

    /// The value of a JavaScript expression (promises awaited).
    pub async fn eval(&self, expression: &str) -> anyhow::Result<Value> {
        let answer = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await?;
        if let Some(details) = answer.get("exceptionDetails") {
            bail!("{expression}: {}", details["exception"]["description"]);
        }
        Ok(answer["result"]["value"].clone())
    }

    /// Waits until `expression` is truthy; its value.
    pub async fn wait_until(&self, what: &str, expression: &str) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let value = self.eval(expression).await?;
            let truthy = match &value {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return Ok(value);
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "waited {WAIT:?} for {what} ({expression}); the page says: {}",
                    self.text("main").await.unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The visible text of the first element matching `selector`.
    pub async fn text(&self, selector: &str) -> anyhow::Result<String> {
        let value = self
            .eval(&format!(
                "document.querySelector({})?.innerText ?? ''",
                json!(selector)
            ))
            .await?;
        Ok(value.as_str().unwrap_or_default().to_string())
    }

    /// Clicks the middle of the first element matching `selector`, as a mouse would.
    pub async fn click(&self, selector: &str) -> anyhow::Result<()> {
        let rect = self
            .eval(&format!(
                "(() => {{ const e = document.querySelector({});
                   if (!e) return null;
                   e.scrollIntoView({{ block: 'center' }});
                   const r = e.getBoundingClientRect();
                   return [r.x + r.width / 2, r.y + r.height / 2]; }})()",
                json!(selector)
            ))
            .await?;
        let (Some(x), Some(y)) = (rect[0].as_f64(), rect[1].as_f64()) else {
            bail!("nothing to click at {selector:?}");
        };
        for kind in ["mouseMoved", "mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({ "type": kind, "x": x, "y": y, "button": "left", "clickCount": 1 }),
            )
            .await?;
        }
        Ok(())
    }

    /// Types `text` where the focus is.
    pub async fn type_text(&self, text: &str) -> anyhow::Result<()> {
        self.call("Input.insertText", json!({ "text": text }))
            .await?;
        Ok(())
    }

    /// Presses and releases a key: `Enter`, `Tab`, `Escape`, `Backspace`.
    pub async fn press(&self, key: &str) -> anyhow::Result<()> {
        let (code, text) = match key {
            "Enter" => (13, "\r"),
            "Tab" => (9, ""),
            "Escape" => (27, ""),
            "Backspace" => (8, ""),
            other => bail!("no key code for {other:?}"),
        };
        let down = json!({
            "type": if text.is_empty() { "rawKeyDown" } else { "keyDown" },
            "key": key, "code": key, "windowsVirtualKeyCode": code, "text": text,
        });
        self.call("Input.dispatchKeyEvent", down).await?;
        self.call(
            "Input.dispatchKeyEvent",
            json!({ "type": "keyUp", "key": key, "code": key, "windowsVirtualKeyCode": code }),
        )
        .await?;
        Ok(())
    }

    /// A PNG of the page as shown, written to `path`.
    pub async fn screenshot(&self, path: &Path) -> anyhow::Result<()> {
        let shot = self
            .call("Page.captureScreenshot", json!({ "format": "png" }))
            .await?;
        let data = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap_or_default())
            .context("decoding the screenshot")?;
        std::fs::write(path, data).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// What the page reported as errors so far: uncaught exceptions, `console.error`,
    /// and the browser's own (a blocked resource, a Content-Security-Policy violation).
    pub fn errors(&self) -> Vec<String> {
        self.errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The error a DevTools event reports, if it is one.
fn page_error(event: &Value) -> Option<String> {
    let params = &event["params"];
    match event["method"].as_str()? {
        "Runtime.exceptionThrown" => Some(format!(
            "exception: {}",
            params["exceptionDetails"]["exception"]["description"]
                .as_str()
                .or(params["exceptionDetails"]["text"].as_str())
                .unwrap_or("?")
        )),
        "Runtime.consoleAPICalled" if params["type"] == "error" => Some(format!(
            "console.error: {}",
            params["args"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|a| a["value"].to_string())
                .collect::<Vec<_>>()
                .join(" ")
        )),
        "Log.entryAdded" if params["entry"]["level"] == "error" => Some(format!(
            "{}: {} ({})",
            params["entry"]["source"].as_str().unwrap_or("browser"),
            params["entry"]["text"].as_str().unwrap_or("?"),
            params["entry"]["url"].as_str().unwrap_or("")
        )),
        _ => None,
    }
}

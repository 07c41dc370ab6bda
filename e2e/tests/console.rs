//! The operator's console in a real browser: Debian's headless Chromium drives
//! `/ui/` of the real relay binary, with real agents, a camera simulator and ffmpeg as
//! a Watcher. Signing in, cameras coming online and going offline live (from the event
//! stream, without reloading), a camera's page, an action, a confirmation, search from
//! the keyboard, a phone's width; no script error and no blocked resource throughout.
//! A second test loads 10,000 cameras and measures what a search costs.
//!
//! `CONSOLE_SCREENSHOT=docs/console.png` keeps the fleet page's screenshot there (the
//! one in the README).

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic

use std::{fmt::Write as _, path::PathBuf, time::Instant};

use e2e::{
    agent_config_json, browser::Browser, ffmpeg_playing, free_port_run, free_ports, http,
    netns::Place, rtsp_url, AgentProcess, CameraSim, RelayProcess,
};
use serde_json::json;

const TOKEN: &str = "console-token";
const ADMIN: &str = "console-admin";
const PATH: &str = "/cam/realmonitor?channel=1&subtype=0";

/// A relay from a relay.toml in `dir`: an admin token, and the cameras `ids`, each
/// with a token, on the camera ports from `first` on (with `pin`, the i-th camera has
/// the i-th port).
async fn relay(
    dir: &tempfile::TempDir,
    ids: &[String],
    first: u16,
    pin: bool,
) -> (RelayProcess, u16) {
    let relay_port = free_ports(1)[0];
    let last = first + ids.len() as u16 - 1;
    let mut config = format!(
        "listen = \"127.0.0.1:{relay_port}\"\nadmin_token = \"{ADMIN}\"\n\
         camera_ports = \"{first}-{last}\"\n"
    );
    for (port, id) in (first..).zip(ids) {
        write!(config, "\n[[agents]]\nid = \"{id}\"\ntoken = \"{TOKEN}\"\n").unwrap();
        if pin {
            writeln!(config, "port = {port}").unwrap();
        }
    }
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, config).unwrap();
    let relay = RelayProcess::start_from_file_in(&Place::host(), &path, "127.0.0.1", relay_port)
        .await
        .unwrap();
    (relay, relay_port)
}

/// The port camera `cam-N` got, from the API.
async fn camera_port(relay_port: u16, id: &str) -> u16 {
    let url = format!("http://127.0.0.1:{relay_port}/agents/{id}");
    let reply = http(&Place::host(), "GET", &url, Some(ADMIN), None)
        .await
        .unwrap();
    let view: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    view["ports"][0].as_u64().unwrap() as u16
}

/// Waits until the page's `expression` is truthy (`what`, for the failure); its value.
async fn until(browser: &Browser, what: &str, expression: &str) -> serde_json::Value {
    browser.wait_until(what, expression).await.unwrap()
}

/// Clicks the camera page's button of `action`; the result, once it says `says`.
async fn act(browser: &Browser, action: &str, says: &str) -> String {
    browser
        .click(&format!("button[data-action=\"{action}\"]"))
        .await
        .unwrap();
    answer(browser, says).await
}

/// The camera page's result of an action, once it says `says`.
async fn answer(browser: &Browser, says: &str) -> String {
    let result = "document.querySelector('#action-result').innerText";
    let text = until(
        browser,
        &format!("the result saying {says:?}"),
        &format!("{result}.includes({}) && {result}", json!(says)),
    )
    .await;
    text.as_str().unwrap().to_string()
}

/// Clicks the button of `action`, which asks first; the question.
async fn ask(browser: &Browser, action: &str) -> String {
    browser
        .click(&format!("button[data-action=\"{action}\"]"))
        .await
        .unwrap();
    until(
        browser,
        "the confirmation",
        "document.querySelector('#confirm').open",
    )
    .await;
    browser.text("#confirm").await.unwrap()
}

/// Nothing on the page needs scrolling sideways.
async fn assert_fits_a_phone(browser: &Browser, page: &str) {
    let overflow = browser
        .eval("document.documentElement.scrollWidth - document.documentElement.clientWidth")
        .await
        .unwrap();
    assert!(
        overflow.as_f64().unwrap() <= 1.0,
        "{page} is {overflow} px too wide for a phone"
    );
}

fn row(id: &str) -> String {
    format!("(document.querySelector('tr[data-camera=\"{id}\"]')?.innerText ?? '')")
}

/// Signs in through the form: the token typed, Enter pressed.
async fn sign_in(browser: &Browser, token: &str) {
    browser.click("#token").await.unwrap();
    browser
        .eval("document.querySelector('#token').select()")
        .await
        .unwrap();
    browser.type_text(token).await.unwrap();
    browser.press("Enter").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_watches_the_fleet_live_and_acts_on_a_camera() {
    let camera = CameraSim::start(&[]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Four cameras configured; three will come online.
    let ids: Vec<String> = (1..=4).map(|i| format!("cam-{i}")).collect();
    let (relay, relay_port) = relay(&dir, &ids, free_port_run(4), true).await;
    let console = format!("http://127.0.0.1:{relay_port}/ui/");

    // The files carry a policy that lets the page load only what the relay serves.
    let reply = http(&Place::host(), "GET", &console, None, None)
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(reply.body.contains("/ui/app.js"));

    let browser = Browser::launch(1280, 800).await.unwrap();
    browser.goto(&console).await.unwrap();
    until(
        &browser,
        "the sign-in form",
        "!document.querySelector('#login').hidden",
    )
    .await;
    assert_eq!(
        browser.eval("document.activeElement.id").await.unwrap(),
        "token",
        "the token field has the focus, to type in at once"
    );

    // A wrong token is refused in words, and nothing else shows.
    sign_in(&browser, "not-the-token").await;
    let refused = until(
        &browser,
        "the refusal",
        "document.querySelector('#login-error').innerText",
    )
    .await;
    assert!(refused.as_str().unwrap().contains("refused"), "{refused}");
    assert!(
        browser
            .eval("document.querySelector('#fleet').hidden")
            .await
            .unwrap()
            == true
    );

    // The right one: the (empty) fleet, and the token in the tab's session only.
    sign_in(&browser, ADMIN).await;
    until(
        &browser,
        "the fleet",
        "!document.querySelector('#fleet').hidden && \
             document.querySelector('#summary').innerText.includes('0 of 4 online')",
    )
    .await;
    assert_eq!(
        browser
            .eval("sessionStorage.getItem('camera-relay.admin-token')")
            .await
            .unwrap(),
        ADMIN
    );
    let href = browser.eval("location.href").await.unwrap();
    assert!(
        !href.as_str().unwrap().contains(ADMIN),
        "the token is in the URL: {href}"
    );
    until(
        &browser,
        "the event stream",
        "document.querySelector('#live').innerText === 'Live'",
    )
    .await;

    // Cameras come online while the page is open; it shows them without reloading.
    browser.eval("window.notReloaded = true").await.unwrap();
    let mut agents = Vec::new();
    for i in 1..=3 {
        let id = format!("cam-{i}");
        let port = camera_port(relay_port, &id).await;
        let config = agent_config_json(&id, &relay.url(), TOKEN, port, camera.port);
        agents.push(AgentProcess::start(&id, &config).await.unwrap());
    }
    for i in 1..=3 {
        browser
            .wait_until(
                &format!("cam-{i} online with its data link"),
                &format!(
                    "{r}.includes('online') && {r}.includes('QUIC')",
                    r = row(&format!("cam-{i}"))
                ),
            )
            .await
            .unwrap();
    }
    assert_eq!(browser.eval("window.notReloaded").await.unwrap(), true);
    let first = browser.eval(&row("cam-1")).await.unwrap();
    let port_1 = camera_port(relay_port, "cam-1").await;
    assert!(
        first.as_str().unwrap().contains(&port_1.to_string()),
        "cam-1's row shows its port {port_1}: {first}"
    );
    let url_1 = browser
        .eval("document.querySelector('tr[data-camera=\"cam-1\"] .url input').value")
        .await
        .unwrap();
    assert_eq!(
        url_1,
        format!("rtsp://127.0.0.1:{port_1}{PATH}"),
        "the URL a VMS should use"
    );

    // Watchers: two cameras are being watched; the rows say so, with media health
    // (bitrate, frame rate) once the relay has measured it.
    let mut watchers = Vec::new();
    for id in ["cam-1", "cam-2"] {
        let port = camera_port(relay_port, id).await;
        watchers.push(ffmpeg_playing(&rtsp_url(port, PATH), 120).unwrap());
    }
    for id in ["cam-1", "cam-2"] {
        until(
            &browser,
            &format!("{id}'s Watcher and its frame rate"),
            &format!("{r}.includes('1 live') && {r}.includes('fps')", r = row(id)),
        )
        .await;
    }
    until(
        &browser,
        "a sparkline drawn from the traffic samples",
        "document.querySelector('tr[data-camera=\"cam-1\"] svg.spark polyline')",
    )
    .await;

    // The screenshot of the fleet page (README).
    let shot = std::env::var_os("CONSOLE_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.path().join("console.png"));
    browser.screenshot(&shot).await.unwrap();
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real picture"
    );

    // Search from the keyboard: Tab from the page to the search field, type.
    browser
        .eval("document.querySelector('#main').focus()")
        .await
        .unwrap();
    let mut tabs = 0;
    while browser.eval("document.activeElement.id").await.unwrap() != "search" {
        browser.press("Tab").await.unwrap();
        tabs += 1;
        assert!(tabs < 10, "the search field is not reachable by Tab");
    }
    browser.type_text("cam-3").await.unwrap();
    until(
        &browser,
        "only cam-3 listed",
        "document.querySelectorAll('#cameras tbody tr').length === 1 && \
             document.querySelector('tr[data-camera=\"cam-3\"]') !== null",
    )
    .await;
    browser
        .eval("document.querySelector('#search').select()")
        .await
        .unwrap();
    browser.press("Backspace").await.unwrap();
    until(
        &browser,
        "all four listed again",
        "document.querySelectorAll('#cameras tbody tr').length === 4",
    )
    .await;

    // One camera: its page, its events (history, then live), its sessions, an action.
    browser.click("tr[data-camera=\"cam-1\"] a").await.unwrap();
    until(
        &browser,
        "cam-1's page with its history",
        "!document.querySelector('#camera').hidden && \
             document.querySelector('#events').innerText.includes('camera.online') && \
             document.querySelector('#sessions tbody').innerText.includes('127.0.0.1')",
    )
    .await;
    let pong = act(&browser, "ping", "pong in").await;
    assert!(pong.contains("QUIC RTT"), "{pong}");

    // An action that interrupts video asks first; Escape answers no, and nothing happens.
    let question = ask(&browser, "tunnel_restart").await;
    assert!(question.contains("loses its video"), "{question}");
    browser.press("Escape").await.unwrap();
    until(
        &browser,
        "the confirmation closed",
        "!document.querySelector('#confirm').open",
    )
    .await;
    assert!(browser
        .text("#action-result")
        .await
        .unwrap()
        .contains("pong in"));
    // An update needs a release for the camera's processor; there is none yet.
    let refused = act(&browser, "update", "Update failed").await;
    assert!(refused.contains("no release for"), "{refused}");
    assert!(
        !watchers[0]
            .output()
            .iter()
            .any(|l| l.contains("progress=end")),
        "the Watcher kept playing"
    );
    // Asked again and confirmed: the tunnel restarts, the Watcher's session with it,
    // and the camera's link comes back.
    ask(&browser, "tunnel_restart").await;
    browser.click("#confirm-ok").await.unwrap();
    let restarted = answer(&browser, "Restart tunnel:").await;
    assert!(restarted.contains("1 Watcher session ended"), "{restarted}");
    until(
        &browser,
        "the link back, the session gone",
        "document.querySelector('#events').innerText.includes('none → quic') && \
             document.querySelector('#events').innerText.includes('watcher.ended')",
    )
    .await;

    // The camera goes offline: its page says so at once, the actions are off.
    agents[0].process.kill().await.unwrap();
    until(
        &browser,
        "cam-1 offline on its page",
        "document.querySelector('#camera-state').innerText.includes('offline') && \
             document.querySelector('#events').innerText.includes('camera.offline') && \
             document.querySelector('button[data-action=\"ping\"]').disabled",
    )
    .await;

    // Back to the fleet by the link; on a phone's width the rows become cards, and
    // nothing needs scrolling sideways.
    browser.click("#camera a[href=\"#/\"]").await.unwrap();
    until(
        &browser,
        "cam-1 offline in the fleet",
        &format!("{}.includes('offline')", row("cam-1")),
    )
    .await;
    browser.viewport(390, 844, true).await.unwrap();
    until(
        &browser,
        "the phone layout",
        "getComputedStyle(document.querySelector('#cameras thead')).display === 'none'",
    )
    .await;
    assert_fits_a_phone(&browser, "the fleet").await;
    browser.click("tr[data-camera=\"cam-2\"] a").await.unwrap();
    until(
        &browser,
        "cam-2's page",
        "document.querySelector('#events').innerText.includes('camera.online')",
    )
    .await;
    assert_fits_a_phone(&browser, "a camera's page").await;
    browser.click("#camera a[href=\"#/\"]").await.unwrap();

    // Signing out forgets the token.
    browser.viewport(1280, 800, false).await.unwrap();
    browser.click("#logout").await.unwrap();
    until(
        &browser,
        "the sign-in form again",
        "!document.querySelector('#login').hidden",
    )
    .await;
    assert_eq!(
        browser
            .eval("sessionStorage.getItem('camera-relay.admin-token')")
            .await
            .unwrap(),
        json!(null)
    );

    // The wrong token's refusal (401) is the one error the browser logged.
    let errors: Vec<String> = browser
        .errors()
        .into_iter()
        .filter(|e| !e.contains("401"))
        .collect();
    assert!(errors.is_empty(), "the page reported errors: {errors:#?}");
    for mut watcher in watchers {
        watcher.kill().await.unwrap();
    }
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_stays_fast_at_ten_thousand_cameras() {
    const CAMERAS: u16 = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<String> = (0..CAMERAS).map(|i| format!("cam-{i:05}")).collect();
    // Offline cameras hold no port: the range needs no checking.
    let (_relay, relay_port) = relay(&dir, &ids, 20_000, false).await;

    let listing = Instant::now();
    let url = format!("http://127.0.0.1:{relay_port}/agents");
    let reply = http(&Place::host(), "GET", &url, Some(ADMIN), None)
        .await
        .unwrap();
    let listing = listing.elapsed();
    assert_eq!(reply.status, 200);

    let browser = Browser::launch(1280, 800).await.unwrap();
    browser
        .goto(&format!("http://127.0.0.1:{relay_port}/ui/"))
        .await
        .unwrap();
    let loaded = Instant::now();
    sign_in(&browser, ADMIN).await;
    until(
        &browser,
        "10,000 cameras listed",
        "document.querySelector('#summary').innerText.includes('0 of 10000 online')",
    )
    .await;
    let loaded = loaded.elapsed();
    // 50 rows a page, not 10,000.
    assert_eq!(
        browser
            .eval("document.querySelectorAll('#cameras tbody tr').length")
            .await
            .unwrap(),
        50
    );
    assert!(browser.text("#page").await.unwrap().contains("of 200"));

    let mut searches = Vec::new();
    for query in ["cam-0", "cam-09", "cam-099", "cam-0999", "cam-09999"] {
        browser.click("#search").await.unwrap();
        browser
            .eval("document.querySelector('#search').select()")
            .await
            .unwrap();
        browser.type_text(query).await.unwrap();
        let timings = until(
            &browser,
            &format!("the search for {query}"),
            &format!(
                "document.querySelector('#search').value === {q} && \
                     window.consoleTimings",
                q = json!(query)
            ),
        )
        .await;
        searches.push((
            query,
            timings["filter_ms"].as_f64().unwrap(),
            timings["render_ms"].as_f64().unwrap(),
        ));
    }
    assert_eq!(
        browser
            .eval("document.querySelectorAll('#cameras tbody tr').length")
            .await
            .unwrap(),
        1,
        "cam-09999 alone matches"
    );
    // Measured, not asserted (speed is the bench's business): printed for the record.
    println!(
        "GET /agents with {CAMERAS} cameras: {listing:?} (curl, {} bytes)",
        reply.body.len()
    );
    println!("sign-in to the listed fleet: {loaded:?}");
    for (query, filter, render) in searches {
        println!("search {query:>10}: filter {filter:.2} ms, filter and render {render:.2} ms");
    }
}

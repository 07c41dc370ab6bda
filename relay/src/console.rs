//! The operator's web console at `/ui/`: a page, a script and a style sheet compiled
//! into the binary (`relay/console/`), nothing fetched from anywhere else. The files
//! are open to anyone, like any login page: they hold no data. Everything the console
//! shows comes from the operator API, which the script calls with the admin token the
//! operator typed into its login form (kept in the tab's session storage, never in a
//! URL).

use axum::{
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Redirect, Response},
    routing::get,
    Router,
};

/// One file of the console.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const ASSETS: &[Asset] = &[
    Asset {
        path: "/ui/",
        content_type: "text/html; charset=utf-8",
        body: include_str!("../console/index.html"),
    },
    Asset {
        path: "/ui/app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../console/app.js"),
    },
    Asset {
        path: "/ui/app.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("../console/app.css"),
    },
    Asset {
        path: "/ui/icon.svg",
        content_type: "image/svg+xml",
        body: include_str!("../console/icon.svg"),
    },
];

/// The page may run only its own script and style, talk only to this relay, and be
/// framed by nobody; the token it holds must not leak through a referrer.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'none'; \
     frame-ancestors 'none'; base-uri 'none'";

/// The console's routes; open (see the module docs).
pub(crate) fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let mut router = Router::new().route("/ui", get(|| async { Redirect::permanent("/ui/") }));
    for asset in ASSETS {
        router = router.route(
            asset.path,
            get(move |headers: HeaderMap| async move { serve(asset, &headers) }),
        );
    }
    router
}

fn serve(asset: &Asset, headers: &HeaderMap) -> Response {
    let etag = etag(asset.body);
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|seen| seen.as_bytes() == etag.as_bytes());
    let status = if fresh {
        StatusCode::NOT_MODIFIED
    } else {
        StatusCode::OK
    };
    let mut response = (status, if fresh { "" } else { asset.body }).into_response();
    let set = response.headers_mut();
    set.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    // Revalidated at every load, so an upgraded relay never runs yesterday's script.
    set.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(etag) = HeaderValue::from_str(&etag) {
        set.insert(header::ETAG, etag);
    }
    set.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    set.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    set.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    set.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

/// A strong validator of a file: FNV-1a of its bytes.
fn etag(body: &str) -> String {
    let hash = body.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("\"{hash:016x}\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_files_the_relay_serves() {
        let page = ASSETS[0].body;
        for reference in page
            .split(['"', '\''])
            .filter(|s| s.starts_with("/ui/") || s.starts_with("http"))
        {
            assert!(
                ASSETS.iter().any(|a| a.path == reference),
                "index.html refers to {reference:?}, which the relay does not serve"
            );
        }
        assert!(page.contains("/ui/app.js") && page.contains("/ui/app.css"));
    }

    #[test]
    fn a_seen_file_is_not_sent_again() {
        let asset = &ASSETS[1];
        let mut headers = HeaderMap::new();
        let first = serve(asset, &headers);
        assert_eq!(first.status(), StatusCode::OK);
        let etag = first.headers()[header::ETAG].clone();
        headers.insert(header::IF_NONE_MATCH, etag);
        assert_eq!(serve(asset, &headers).status(), StatusCode::NOT_MODIFIED);
    }
}

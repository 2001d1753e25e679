//! The operator dashboard's static assets, compiled into the binary (plain
//! HTML, CSS and JavaScript: no framework, no CDN, no build step), served
//! on the API listener under `/ui/` (`/` redirects there).
//!
//! The assets carry no data, so they are served without a token; every
//! figure the page shows comes from the JSON API with the operator's
//! bearer token (the page asks for it once and keeps it in the tab's
//! `sessionStorage`). The page's Content-Security-Policy allows only its
//! own files and the API on the same origin.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const APP_CSS: &str = include_str!("dashboard/app.css");

/// The content security policy of every asset: own origin only, no
/// inline scripts or styles, no frames.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
                   form-action 'none'; frame-ancestors 'none'";

/// Whether `path` is one of the dashboard's static assets (served
/// without a token: they carry no data).
pub fn is_public(path: &str) -> bool {
    path == "/" || path == "/ui" || path.starts_with("/ui/")
}

/// Bytes of HTML, JavaScript and CSS a browser loads for the dashboard.
pub fn page_weight() -> [(&'static str, usize); 3] {
    [
        ("index.html", INDEX_HTML.len()),
        ("app.js", APP_JS.len()),
        ("app.css", APP_CSS.len()),
    ]
}

/// The dashboard's routes (merged into the API router).
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/") }))
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route(
            "/ui/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/ui/index.html",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/ui/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/ui/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        )
        .route(
            "/ui/{*rest}",
            get(|| async { (StatusCode::NOT_FOUND, "no such dashboard file").into_response() }),
        )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Revalidated on every load: a new allocator version brings new assets.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_dashboard_files_are_public() {
        for p in ["/", "/ui", "/ui/", "/ui/app.js"] {
            assert!(is_public(p), "{p}");
        }
        for p in ["/v1/devices", "/uix", "/v1/ui/", "/metrics", "//ui/"] {
            assert!(!is_public(p), "{p}");
        }
    }

    #[test]
    fn the_assets_reference_only_their_own_files() {
        // Offline and under the CSP: no remote URL, no inline script or style.
        for (name, text) in [("index", INDEX_HTML), ("js", APP_JS), ("css", APP_CSS)] {
            // The SVG namespace is a name, not something fetched.
            let text = text.replace("http://www.w3.org/2000/svg", "");
            assert!(!text.contains("http://"), "{name} names a remote URL");
            assert!(!text.contains("https://"), "{name} names a remote URL");
        }
        assert!(INDEX_HTML.contains(r#"<script src="app.js""#));
        assert!(!INDEX_HTML.contains("<script>"));
        assert!(!INDEX_HTML.contains("<style"));
    }
}

//! What the dashboard tests (`dashboard`, `dashboard_analytics`, `dashboard_browser`) share:
//! a client that follows no redirects, signing in without a browser, and reading pages and
//! API reports.

use serde_json::Value;

use super::{ADMIN_KEY, Answer, Gateway};

/// A client that follows no redirects and keeps no cookies.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Signs in with `key` (`POST /dashboard/login`) and returns the `Cookie` header to send.
pub async fn sign_in(gw: &Gateway, key: &str) -> String {
    let response = client()
        .post(gw.url("/dashboard/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("key={key}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 303);
    let set_cookie = response.headers()["set-cookie"].to_str().unwrap();
    let pair = set_cookie.split(';').next().unwrap().trim();
    assert!(pair.starts_with("mc_session="), "{set_cookie}");
    pair.to_owned()
}

/// A dashboard page read with `cookie` (without a browser), redirects not followed.
pub async fn page(gw: &Gateway, cookie: &str, path: &str) -> Answer {
    Answer::read(
        client()
            .get(gw.url(path))
            .header("cookie", cookie)
            .send()
            .await
            .unwrap(),
    )
    .await
}

/// `GET {path}` of the API as the admin; must be a 200.
pub async fn api(gw: &Gateway, path: &str) -> Value {
    let answer = gw
        .send(reqwest::Method::GET, path, Some(ADMIN_KEY), None)
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    answer.json()
}

/// `1234567` as the page writes it: `1,234,567`.
pub fn thousands(n: i64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The API's nine-digit USD string as the analytics page writes it: without trailing zeros
/// beyond the cents, with `$`.
pub fn dollars(cost_usd: &str) -> String {
    let (whole, fraction) = cost_usd.split_once('.').unwrap();
    let fraction = fraction.trim_end_matches('0');
    format!("${whole}.{fraction:0<2}")
}

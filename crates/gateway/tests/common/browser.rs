//! Headless Chromium for the dashboard tests, driven over WebDriver (`chromedriver`) with
//! fantoccini. Include it with `#[path = "common/browser.rs"] mod browser;`.
//!
//! Chromium and chromedriver come from Debian's `chromium` and `chromium-driver` packages
//! (or `CHROMIUM` / `CHROMEDRIVER`). Missing, a test skips with a printed reason — unless
//! `REQUIRE_SERVICES=1`, where it fails.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::process::{Child, Command};

fn find(variable: &str, names: &[&str]) -> Option<PathBuf> {
    if let Ok(path) = std::env::var(variable)
        && !path.is_empty()
    {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |name| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

/// A headless Chromium session; dropping it ends chromedriver and its Chromium.
pub struct Browser {
    pub client: Client,
    driver: Child,
    profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        // A test that panicked never closed its session: Chromium would outlive chromedriver.
        // Its profile folder is unique, so it names exactly this test's processes.
        let _ = std::process::Command::new("pkill")
            .arg("-f")
            .arg(self.profile.path())
            .status();
    }
}

impl Browser {
    /// Starts chromedriver and a headless Chromium, or `None` (skipped, saying why) when
    /// they are not installed and `REQUIRE_SERVICES` is not `1`.
    pub async fn start() -> Option<Self> {
        let chromium = find(
            "CHROMIUM",
            &["chromium", "chromium-browser", "google-chrome"],
        );
        let driver = find("CHROMEDRIVER", &["chromedriver"]);
        let (Some(chromium), Some(driver)) = (chromium, driver) else {
            if std::env::var("REQUIRE_SERVICES").as_deref() == Ok("1") {
                panic!("REQUIRE_SERVICES=1 but chromium or chromedriver is not installed");
            }
            eprintln!("skipping browser test: chromium or chromedriver not installed");
            return None;
        };
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let child = Command::new(&driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", driver.display()));
        let profile = tempfile::tempdir().unwrap();
        let capabilities = serde_json::json!({
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    format!("--user-data-dir={}", profile.path().display()),
                    "--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-dev-shm-usage", "--window-size=1280,1000",
                    "--no-first-run", "--no-default-browser-check",
                ],
            }
        });
        let capabilities = capabilities.as_object().unwrap().clone();
        let url = format!("http://127.0.0.1:{port}");
        let mut last_error = None;
        for _ in 0..100 {
            match ClientBuilder::new(HttpConnector::new())
                .capabilities(capabilities.clone())
                .connect(&url)
                .await
            {
                Ok(client) => {
                    return Some(Self {
                        client,
                        driver: child,
                        profile,
                    });
                }
                Err(error) => {
                    last_error = Some(error.to_string());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        panic!("cannot start a Chromium session: {last_error:?}");
    }

    /// Saves a screenshot of the current page as `target/dashboard-screenshots/{name}.png`.
    pub async fn screenshot(&self, name: &str) {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .unwrap()
            .join("dashboard-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let png = self.client.screenshot().await.unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }

    /// Opens `url`.
    pub async fn open(&self, url: &str) {
        self.client.goto(url).await.unwrap();
    }

    /// The text of the first element matching the CSS `selector`.
    pub async fn text(&self, selector: &str) -> String {
        self.client
            .find(Locator::Css(selector))
            .await
            .unwrap_or_else(|e| panic!("no element {selector}: {e}"))
            .text()
            .await
            .unwrap()
    }

    /// Types `value` into the input matching `selector`, replacing what it held.
    pub async fn fill(&self, selector: &str, value: &str) {
        let input = self
            .client
            .find(Locator::Css(selector))
            .await
            .unwrap_or_else(|e| panic!("no input {selector}: {e}"));
        input.clear().await.unwrap();
        input.send_keys(value).await.unwrap();
    }

    /// Clicks the element matching `selector` (and waits for the next page if it navigates).
    pub async fn click(&self, selector: &str) {
        self.client
            .find(Locator::Css(selector))
            .await
            .unwrap_or_else(|e| panic!("no element {selector}: {e}"))
            .click()
            .await
            .unwrap();
    }

    /// Selects the option with `value` in the `<select>` matching `selector`.
    pub async fn select(&self, selector: &str, value: &str) {
        self.client
            .find(Locator::Css(selector))
            .await
            .unwrap_or_else(|e| panic!("no select {selector}: {e}"))
            .select_by_value(value)
            .await
            .unwrap();
    }

    /// The page's source.
    pub async fn source(&self) -> String {
        self.client.source().await.unwrap()
    }

    /// The current URL.
    pub async fn url(&self) -> String {
        self.client.current_url().await.unwrap().to_string()
    }

    /// Ends the browser session.
    pub async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}

//! HTTPS upstreams: `meta-chat serve` as a real process reaching the fake OpenAI upstream
//! through a TLS front whose certificate a test CA signed, trusted through `SSL_CERT_FILE`
//! (read by the platform verifier on Linux, as `update-ca-certificates` would install it).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};

use common::free_port;
use meta_chat_testkit::{FakeServer, Reply};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Child;

const ADMIN_KEY: &str = "admin-tls-test-key-0123456789abcdef0";

/// A certificate authority of the test, and a `localhost` server certificate it signed.
struct Pki {
    ca_pem: String,
    server_chain: Vec<CertificateDer<'static>>,
    server_key: PrivateKeyDer<'static>,
}

fn pki(name: &str) -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, name);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let mut server = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    server
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server.signed_by(&server_key, &ca_cert, &ca_key).unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        server_chain: vec![server_cert.der().clone(), ca_cert.der().clone()],
        server_key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
    }
}

/// A TLS front for `upstream` (plain HTTP/1.1 and h2c), offering HTTP/2 and HTTP/1.1 by ALPN;
/// records the protocol each handshake settled on (`""` for none).
async fn tls_front(pki: &Pki, upstream: String) -> (u16, Arc<Mutex<Vec<String>>>) {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(pki.server_chain.clone(), pki.server_key.clone_key())
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let (acceptor, record, upstream) = (acceptor.clone(), record.clone(), upstream.clone());
            tokio::spawn(async move {
                // A refused handshake (the gateway not trusting the certificate) ends here.
                let Ok(mut tls) = acceptor.accept(client).await else {
                    return;
                };
                let alpn = tls.get_ref().1.alpn_protocol().unwrap_or_default();
                record
                    .lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(alpn).into_owned());
                let mut plain = TcpStream::connect(upstream).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    (port, seen)
}

/// `meta-chat serve` with `https://localhost:{front}` as its OpenAI upstream, trusting the CA
/// in `ca_pem` only.
async fn start(dir: &Path, port: u16, front: u16, ca_pem: &str) -> Child {
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let vars = [
        ("BIND_ADDR", format!("127.0.0.1:{port}")),
        ("ADMIN_API_KEY", ADMIN_KEY.to_owned()),
        ("OPENAI_API_KEY", "sk-test".to_owned()),
        ("OPENAI_BASE_URL", format!("https://localhost:{front}")),
        ("SSL_CERT_FILE", ca_file.display().to_string()),
        ("SSL_CERT_DIR", String::new()),
    ];
    common::serve_until_listening(dir, &vars).await.0
}

/// A tenant on the OpenAI upstream; its API key.
async fn tenant(client: &reqwest::Client, base: &str) -> String {
    let created: Value = client
        .post(format!("{base}/api/tenants"))
        .bearer_auth(ADMIN_KEY)
        .json(&json!({"name": "tls", "settings": {"llm": {"provider": "openai", "model": "gpt-4o-mini"}}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    created["apiKey"].as_str().expect("an API key").to_owned()
}

fn client() -> reqwest::Client {
    meta_chat_llm::install_crypto_provider();
    reqwest::Client::builder().no_proxy().build().unwrap()
}

#[tokio::test]
async fn https_upstreams_are_verified_and_spoken_to_over_http2() {
    let fake = FakeServer::start().await.unwrap();
    let pki = pki("meta-chat test CA");
    let upstream = fake.url().trim_start_matches("http://").to_owned();
    let (front, seen) = tls_front(&pki, upstream).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let gateway = start(dir.path(), port, front, &pki.ca_pem).await;
    let base = format!("http://127.0.0.1:{port}");
    let client = client();
    let key = tenant(&client, &base).await;

    fake.push(Reply::text("over TLS"));
    let answer = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"], "over TLS",
        "{body}"
    );

    // A stream over the same connection.
    fake.push(Reply::text("streamed over TLS"));
    let streamed = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.status(), 200);
    let text = streamed.text().await.unwrap();
    let content: String = text
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter(|data| *data != "[DONE]")
        .filter_map(|data| serde_json::from_str::<Value>(data).ok())
        .filter_map(|event| {
            event["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(content, "streamed over TLS", "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");

    // The upstream saw both requests with the provider's key, on HTTP/2 chosen by ALPN over
    // one TLS connection.
    let requests = fake.requests_to("/v1/chat/completions");
    assert_eq!(requests.len(), 2);
    assert_eq!(*seen.lock().unwrap(), vec!["h2".to_owned()]);
    drop(gateway);
}

#[tokio::test]
async fn an_upstream_certificate_no_trusted_authority_signed_is_refused() {
    let fake = FakeServer::start().await.unwrap();
    fake.set_default_reply(Reply::text("never"));
    let served = pki("meta-chat test CA");
    let trusted = pki("another test CA");
    let upstream = fake.url().trim_start_matches("http://").to_owned();
    let (front, seen) = tls_front(&served, upstream).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let gateway = start(dir.path(), port, front, &trusted.ca_pem).await;
    let base = format!("http://127.0.0.1:{port}");
    let client = client();
    let key = tenant(&client, &base).await;

    let answer = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 502);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_connection_error", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("certificate"), "{message}");
    assert!(!message.contains("sk-test"), "{message}");
    assert!(fake.requests().is_empty(), "nothing reached the upstream");
    assert!(seen.lock().unwrap().is_empty(), "no handshake completed");
    drop(gateway);
}

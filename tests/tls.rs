//! TLS 1.3 on every connection: a migration over TLS (with the pre-shared key too) verifies; a
//! destination that does not trust the source's certificate, or expects another name, is
//! refused. The certificate is made with the `openssl` command (skipped, with the reason, if
//! it is missing).

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::*;
use postcopy::dest::{self, EngineConfig};
use postcopy::link::tls::{TlsClient, TlsServer};

struct Certs {
    dir: PathBuf,
}

impl Certs {
    fn make(tag: &str) -> Option<Certs> {
        let dir = std::env::temp_dir().join(format!("pc-tls-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        // a, b: leaf certificates (each its own trust anchor); c: a CA certificate (the
        // default of `openssl req -x509`), which rustls refuses as a server's own.
        for (name, ca) in [("a", "CA:FALSE"), ("b", "CA:FALSE"), ("c", "CA:TRUE")] {
            let mut openssl = Command::new("openssl");
            openssl
                .args([
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                ])
                .args(["-nodes", "-days", "1", "-subj", "/CN=postcopy"])
                .args(["-addext", "subjectAltName=DNS:postcopy", "-addext"])
                .arg(format!("basicConstraints=critical,{ca}"))
                .arg("-keyout")
                .arg(dir.join(format!("{name}.key")))
                .arg("-out")
                .arg(dir.join(format!("{name}.pem")))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let ok = Proc::spawn(&mut openssl, "openssl req")
                .map(|p| p.wait_output(TIMEOUT).status.success())
                .unwrap_or(false);
            if !ok {
                eprintln!("skipped: `openssl req` is not available to make a test certificate");
                let _ = std::fs::remove_dir_all(&dir);
                return None;
            }
        }
        Some(Certs { dir })
    }
    fn path(&self, f: &str) -> PathBuf {
        self.dir.join(f)
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn server(c: &Certs, name: &str) -> TlsServer {
    TlsServer::from_files(
        &c.path(&format!("{name}.pem")),
        &c.path(&format!("{name}.key")),
    )
    .expect("server identity")
}

fn tls_source(c: &Certs) -> TlsSource {
    tls_source_as(c, "a")
}

type TlsSource = (
    std::net::SocketAddr,
    postcopy::source::StopHandle,
    std::thread::JoinHandle<()>,
    postcopy::image::Synthetic,
);

/// A TLS source serving with certificate `name`.
fn tls_source_as(c: &Certs, name: &str) -> TlsSource {
    let image = postcopy::image::Synthetic::new(layout(32 * MIB), 31, 20);
    let server = postcopy::source::SourceServer::bind(
        "127.0.0.1:0",
        std::sync::Arc::new(image.clone()),
        postcopy::source::SourceConfig {
            verbose: std::env::var_os("PC_VERBOSE").is_some(),
            tls: Some(server(c, name)),
            key: Some(postcopy::link::auth::Key::from_secret(
                b"tls test key, thirty-two bytes!!",
            )),
            ..Default::default()
        },
    )
    .expect("bind");
    let addr = server.local_addr();
    let stop = server.stop_handle();
    let t = std::thread::spawn(move || {
        let _ = server.run();
    });
    (addr, stop, t, image)
}

#[test]
fn migration_over_tls_verifies() {
    let Some(c) = Certs::make("ok") else { return };
    let (addr, stop, t, image) = tls_source(&c);
    let config = EngineConfig {
        source: addr.to_string(),
        workers: 2,
        pin: false,
        key: Some(postcopy::link::auth::Key::from_secret(
            b"tls test key, thirty-two bytes!!",
        )),
        tls: Some(TlsClient::from_ca(&c.path("a.pem"), "postcopy").expect("trust")),
        ..Default::default()
    };
    let connected = dest::connect(&config).expect("connect over TLS");
    let ram = std::sync::Arc::new(dest::DestRam::new(&connected.welcome.layout).unwrap());
    let handle = dest::Engine::start(connected, ram.clone(), &config).expect("start");
    let report = wait_engine(handle, TIMEOUT, "migration over TLS").expect("migration over TLS");
    assert!(ram.complete());
    let bad = verify_pages(&ram, &image, false);
    assert!(bad.is_empty(), "{} pages differ", bad.len());
    assert_eq!(
        report.totals.pages_by_fault + report.totals.pages_by_stream,
        32 * MIB / PAGE
    );
    stop.stop();
    join_within(t, STOP_GRACE, "TLS source after its stop");
}

#[test]
fn untrusted_or_misnamed_source_is_refused() {
    let Some(c) = Certs::make("bad") else { return };
    let (addr, stop, t, _) = tls_source(&c);
    for (ca, name, why) in [
        ("b.pem", "postcopy", "is not signed by the --tls-ca"),
        ("a.pem", "other-name", "does not carry the name"),
    ] {
        let config = EngineConfig {
            source: addr.to_string(),
            workers: 1,
            key: Some(postcopy::link::auth::Key::from_secret(
                b"tls test key, thirty-two bytes!!",
            )),
            tls: Some(TlsClient::from_ca(&c.path(ca), name).expect("trust")),
            ..Default::default()
        };
        let e = dest::connect(&config).expect_err("refused");
        assert!(e.to_string().contains("TLS handshake"), "{ca} {name}: {e}");
        assert!(e.to_string().contains(why), "{ca} {name}, in words: {e}");
    }
    // A plain-TCP destination against a TLS source gets no session either.
    let config = EngineConfig {
        source: addr.to_string(),
        workers: 1,
        connect_timeout: std::time::Duration::from_secs(2),
        key: Some(postcopy::link::auth::Key::from_secret(
            b"tls test key, thirty-two bytes!!",
        )),
        ..Default::default()
    };
    assert!(dest::connect(&config).is_err());
    stop.stop();
    join_within(t, STOP_GRACE, "TLS source after its stop");
}

#[test]
fn a_ca_certificate_as_the_sources_own_is_refused_saying_how_to_make_one() {
    let Some(c) = Certs::make("ca") else { return };
    let (addr, stop, t, _) = tls_source_as(&c, "c");
    let config = EngineConfig {
        source: addr.to_string(),
        workers: 1,
        key: Some(postcopy::link::auth::Key::from_secret(
            b"tls test key, thirty-two bytes!!",
        )),
        tls: Some(TlsClient::from_ca(&c.path("c.pem"), "postcopy").expect("trust")),
        ..Default::default()
    };
    let e = dest::connect(&config).expect_err("refused");
    assert!(
        e.to_string().contains("basicConstraints=critical,CA:FALSE"),
        "{e}"
    );
    stop.stop();
    join_within(t, STOP_GRACE, "TLS source after its stop");
}

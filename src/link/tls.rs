//! Optional TLS 1.3 on every connection (rustls, `ring` provider), for confidentiality on top
//! of [`crate::link::auth`]'s authentication.
//!
//! This kernel has no kTLS (`tcp_available_ulp` lacks `tls`), so records are encrypted and
//! decrypted in user space. To keep the engine's io_uring data path unchanged, each TLS
//! connection is relayed: after the handshake, two relay threads move bytes between the TLS
//! socket and one end of a loopback TCP pair; the protocol code (engine, source) uses the other
//! end as if it were the connection. The price is a thread per direction and one more copy;
//! `README.md` has the measured cost.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// TLS errors, in words an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read {what} {path}: {detail}")]
    Pem {
        /// Which file.
        what: &'static str,
        /// The path.
        path: String,
        /// Why.
        detail: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
    /// The handshake failed (wrong CA, wrong name, not TLS, ...).
    #[error("TLS handshake with {peer}: {detail}")]
    Handshake {
        /// The peer.
        peer: String,
        /// Why.
        detail: String,
    },
    /// A socket error while setting up the relay.
    #[error("TLS relay: {0}")]
    Io(#[from] std::io::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |detail: String| TlsError::Pem {
        what: "certificate file",
        path: path.display().to_string(),
        detail,
    };
    let v: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem(e.to_string()))?;
    if v.is_empty() {
        return Err(pem("no certificate in it".into()));
    }
    Ok(v)
}

/// A source's TLS identity: its certificate chain and key (PEM).
#[derive(Clone)]
pub struct TlsServer(Arc<rustls::ServerConfig>);

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsServer(..)")
    }
}

impl TlsServer {
    /// Loads `cert` (PEM chain) and `key` (PEM private key). TLS 1.3 only.
    pub fn from_files(cert: &Path, key: &Path) -> Result<TlsServer, TlsError> {
        let chain = certs(cert)?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Pem {
            what: "key file",
            path: key.display().to_string(),
            detail: e.to_string(),
        })?;
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        Ok(TlsServer(Arc::new(config)))
    }

    /// Handshakes on an accepted connection and returns the plaintext end of its relay.
    pub fn accept(&self, tcp: TcpStream) -> Result<TcpStream, TlsError> {
        let conn = rustls::ServerConnection::new(self.0.clone())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        relay(tcp, rustls::Connection::Server(conn))
    }
}

/// A destination's TLS trust: the CA (PEM) that signed the source's certificate, and the name
/// the certificate must carry.
#[derive(Clone)]
pub struct TlsClient {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsClient({:?})", self.name)
    }
}

impl TlsClient {
    /// Trusts the certificates in `ca` (PEM) for a source named `name` (a DNS name in its
    /// certificate). TLS 1.3 only.
    pub fn from_ca(ca: &Path, name: &str) -> Result<TlsClient, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in certs(ca)? {
            roots.add(c).map_err(|e| TlsError::Config(e.to_string()))?;
        }
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = ServerName::try_from(name.to_string())
            .map_err(|e| TlsError::Config(format!("server name {name:?}: {e}")))?;
        Ok(TlsClient {
            config: Arc::new(config),
            name,
        })
    }

    /// Handshakes on a connected socket and returns the plaintext end of its relay.
    pub fn connect(&self, tcp: TcpStream) -> Result<TcpStream, TlsError> {
        let conn = rustls::ClientConnection::new(self.config.clone(), self.name.clone())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        relay(tcp, rustls::Connection::Client(conn))
    }
}

/// Completes the handshake on `tcp` (its timeouts apply), then relays between it and a
/// loopback pair; returns the pair's other end.
/// A handshake's failure in words an operator can act on (rustls's own are type names).
fn in_words(e: &std::io::Error) -> String {
    use rustls::CertificateError as C;
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return e.to_string();
    };
    let why = match tls {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer | C::BadSignature => {
                "the source's certificate is not signed by the --tls-ca given here (or is not it)"
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                "the source's certificate does not carry the name --tls-name asks for (its \
                 subjectAltName)"
            }
            C::Expired | C::ExpiredContext { .. } => "the source's certificate has expired",
            C::NotValidYet | C::NotValidYetContext { .. } => {
                "the source's certificate is not valid yet (check both clocks)"
            }
            C::Revoked => "the source's certificate is revoked",
            C::BadEncoding => "the source's certificate cannot be parsed",
            C::Other(o) if o.to_string().contains("CaUsedAsEndEntity") => {
                "the source's certificate is a CA certificate: make it with \
                 `-addext basicConstraints=critical,CA:FALSE` (see the README's recipe), or \
                 sign one with this CA"
            }
            _ => return format!("the source's certificate is refused: {tls}"),
        },
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateHandshakeMessage { .. } => {
            "the peer does not speak TLS (a source without --tls-cert, or not a postcopy source)"
        }
        rustls::Error::AlertReceived(a) => {
            return format!("the peer refused the handshake ({a:?}): check both sides' TLS options")
        }
        rustls::Error::NoCertificatesPresented => "the peer presented no certificate",
        _ => return tls.to_string(),
    };
    why.to_string()
}

fn relay(mut tcp: TcpStream, mut conn: rustls::Connection) -> Result<TcpStream, TlsError> {
    let peer = tcp
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)
            .map_err(|e| TlsError::Handshake {
                peer: peer.clone(),
                detail: in_words(&e),
            })?;
    }
    tcp.set_read_timeout(None)?;
    tcp.set_nodelay(true)?;
    // Every write is turned into records and sent at once: no cap on what one write buffers
    // (rustls caps unsent plaintext at 64 KiB by default, and a capped write_all would fail).
    conn.set_buffer_limit(None);
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let ours = TcpStream::connect(listener.local_addr()?)?;
    let (theirs, _) = listener.accept()?;
    ours.set_nodelay(true)?;
    theirs.set_nodelay(true)?;
    let conn = Arc::new(Mutex::new(conn));
    // Writes of TLS records to the socket, from either thread, in the order they were made.
    let tcp_w = Arc::new(Mutex::new(tcp.try_clone()?));
    let (tcp_r, plain_r, plain_w) = (tcp, theirs.try_clone()?, theirs);
    {
        let (conn, tcp_w) = (conn.clone(), tcp_w.clone());
        std::thread::Builder::new()
            .name("tls-in".into())
            .spawn(move || inbound(tcp_r, plain_w, &conn, &tcp_w))?;
    }
    std::thread::Builder::new()
        .name("tls-out".into())
        .spawn(move || outbound(plain_r, &conn, &tcp_w))?;
    Ok(ours)
}

/// Sends what the connection wants to send (records, alerts), holding the socket's write lock.
fn flush(conn: &Mutex<rustls::Connection>, tcp_w: &Mutex<TcpStream>) -> std::io::Result<()> {
    let mut tcp = tcp_w.lock().expect("poisoned");
    let mut out = Vec::new();
    {
        let mut c = conn.lock().expect("poisoned");
        while c.wants_write() {
            c.write_tls(&mut out)?;
        }
    }
    tcp.write_all(&out)
}

/// Ciphertext from the socket → plaintext to the protocol end.
fn inbound(
    mut tcp: TcpStream,
    mut plain: TcpStream,
    conn: &Mutex<rustls::Connection>,
    tcp_w: &Mutex<TcpStream>,
) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut clear = Vec::with_capacity(512 * 1024);
    let result: std::io::Result<()> = (|| loop {
        let n = tcp.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        let mut rest = &buf[..n];
        let mut wants_write = false;
        {
            let mut c = conn.lock().expect("poisoned");
            while !rest.is_empty() {
                c.read_tls(&mut rest)?;
                c.process_new_packets()
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
                loop {
                    let at = clear.len();
                    clear.resize(at + 64 * 1024, 0);
                    match c.reader().read(&mut clear[at..]) {
                        Ok(0) => {
                            clear.truncate(at);
                            break;
                        }
                        Ok(k) => clear.truncate(at + k),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            clear.truncate(at);
                            break;
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            wants_write |= c.wants_write();
        }
        plain.write_all(&clear)?;
        clear.clear();
        if wants_write {
            flush(conn, tcp_w)?;
        }
    })();
    let _ = result;
    // The peer closed or broke the connection: so does our end.
    let _ = plain.shutdown(Shutdown::Write);
    let _ = tcp.shutdown(Shutdown::Read);
}

/// Plaintext from the protocol end → ciphertext to the socket.
fn outbound(mut plain: TcpStream, conn: &Mutex<rustls::Connection>, tcp_w: &Mutex<TcpStream>) {
    let mut buf = vec![0u8; 256 * 1024];
    let result: std::io::Result<()> = (|| loop {
        let n = plain.read(&mut buf)?;
        let mut tcp = tcp_w.lock().expect("poisoned");
        let mut out = Vec::with_capacity(n + 1024);
        {
            let mut c = conn.lock().expect("poisoned");
            if n == 0 {
                c.send_close_notify();
            } else {
                c.writer().write_all(&buf[..n])?;
            }
            while c.wants_write() {
                c.write_tls(&mut out)?;
            }
        }
        tcp.write_all(&out)?;
        if n == 0 {
            return tcp.shutdown(Shutdown::Write);
        }
    })();
    if result.is_err() {
        // The socket broke: make sure the protocol end sees it.
        let _ = plain.shutdown(Shutdown::Both);
        let _ = tcp_w.lock().expect("poisoned").shutdown(Shutdown::Both);
    }
}

//! Opening a connection to the source: TCP (and TLS), the challenge-response, `Hello` /
//! `Welcome`, and the zero-page map when asked for. Every connection of the destination (the
//! handshake, each worker's urgent and bulk connection, verify, the ones reopened after a
//! break) is opened here.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};

use super::{io_err, DestError, EngineConfig};
use crate::codec::{page_bit, CodecError, Header, Kind, Role, Welcome, HEADER_BYTES};
use crate::layout::{Layout, PageBitmap};
use crate::link::{FramedStream, LinkError};

/// A handshaken session: worker 0's urgent connection and what the source said.
#[derive(Debug)]
pub struct Connected {
    /// The source's `Welcome`.
    pub welcome: Welcome,
    /// Worker 0's urgent connection (authenticated when a key is configured).
    pub(crate) control: FramedStream,
    /// The zero-page map (per block, bit set = zero page), when asked for; after precopy, the
    /// zero pages precopy announced for pages not yet present.
    pub zero_map: Option<Vec<PageBitmap>>,
    /// Whether a precopy phase follows (the `Hello` offered it): call
    /// [`super::receive_precopy`].
    pub precopy: bool,
}

/// A connection after `Hello`/`Welcome`.
pub(crate) struct Opened {
    pub(crate) link: FramedStream,
    pub(crate) welcome: Welcome,
    pub(crate) zero_map: Option<Vec<PageBitmap>>,
}

/// A link error, in the destination's words (`context`: which connection).
pub(crate) fn link_err(context: &str) -> impl FnOnce(LinkError) -> DestError + '_ {
    move |e| match e {
        LinkError::Io { what, source } => DestError::Io {
            context: format!("{context}: {what}"),
            source,
        },
        LinkError::Protocol(source) => DestError::Protocol {
            context: context.into(),
            source,
        },
        LinkError::Auth(e) => DestError::Auth(e),
        LinkError::Remote(message) => DestError::Remote(message),
    }
}

/// Opens a connection of `role` for `worker` and exchanges `Hello`/`Welcome`.
pub(crate) fn open_connection(
    config: &EngineConfig,
    session: u64,
    role: Role,
    worker: u16,
) -> Result<Opened, DestError> {
    open_connection_as(config, session, role, worker, false)
}

/// [`open_connection`], marked as rejoining its session after a break when `resume`.
pub(crate) fn open_connection_as(
    config: &EngineConfig,
    session: u64,
    role: Role,
    worker: u16,
    resume: bool,
) -> Result<Opened, DestError> {
    let mut link = FramedStream::new(dial(config)?);
    let context = format!("{role:?} connection of worker {worker}");
    if let Some(key) = &config.key {
        crate::link::handshake::connect(&mut link, key).map_err(link_err(&context))?;
    }
    let mut h = Header::hello(session, role, worker, config.workers as u16);
    // With precopy, zero pages travel as flags in the precopy rounds instead of a map.
    let want_zero_map = config.zero_map && session == 0 && !config.precopy;
    if want_zero_map {
        h = h.with_zero_map();
    }
    if config.precopy && session == 0 {
        h = h.with_precopy();
    }
    if resume {
        h = h.with_resume();
    }
    let mut hello = [0u8; HEADER_BYTES];
    h.encode(&mut hello);
    link.write_frames(&hello).map_err(link_err("send Hello"))?;
    let welcome = read_welcome(&mut link, config).map_err(link_err(&context))?;
    let zero_map = if want_zero_map {
        Some(read_zero_map(&mut link, &welcome.layout).map_err(link_err(&context))?)
    } else {
        None
    };
    link.socket()
        .set_read_timeout(None)
        .map_err(io_err("clear timeout"))?;
    Ok(Opened {
        link,
        welcome,
        zero_map,
    })
}

/// TCP (and TLS) to the source, with the handshake timeout as the read timeout.
fn dial(config: &EngineConfig) -> Result<TcpStream, DestError> {
    let connect_err = |source| DestError::Connect {
        addr: config.source.clone(),
        source,
    };
    let addr: SocketAddr = config
        .source
        .to_socket_addrs()
        .map_err(connect_err)?
        .next()
        .ok_or_else(|| {
            connect_err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no address",
            ))
        })?;
    let mut stream =
        TcpStream::connect_timeout(&addr, config.connect_timeout).map_err(connect_err)?;
    stream
        .set_nodelay(true)
        .map_err(io_err("set TCP_NODELAY"))?;
    if let Some(tls) = &config.tls {
        stream
            .set_read_timeout(Some(config.connect_timeout))
            .map_err(io_err("set handshake timeout"))?;
        stream = tls.connect(stream)?;
    }
    stream
        .set_read_timeout(Some(config.connect_timeout))
        .map_err(io_err("set handshake timeout"))?;
    Ok(stream)
}

/// Reads the source's `Welcome` (an `Error` frame is the source's refusal, its MAC checked).
fn read_welcome(link: &mut FramedStream, config: &EngineConfig) -> Result<Welcome, LinkError> {
    let keyless = config.key.is_none();
    let h = link
        .read_frame_if(|h| match h.kind {
            Kind::Welcome => Ok(()),
            got => Err(CodecError::Unexpected {
                got,
                expected: "Welcome",
            }),
        })
        .map_err(|e| match e {
            // A source that asks for a key we do not hold.
            LinkError::Protocol(CodecError::Unexpected {
                got: Kind::Challenge,
                ..
            }) if keyless => crate::link::auth::AuthError::KeyRequired.into(),
            e => e,
        })?;
    let Some(h) = h else {
        return Err(LinkError::Io {
            what: "read handshake reply",
            source: std::io::ErrorKind::UnexpectedEof.into(),
        });
    };
    Ok(Welcome::decode_body(&h, link.body())?)
}

/// Reads `ZeroMap` frames until `Run`: one bitmap per block, bit set = zero page.
fn read_zero_map(link: &mut FramedStream, layout: &Layout) -> Result<Vec<PageBitmap>, LinkError> {
    let map: Vec<PageBitmap> = layout
        .blocks
        .iter()
        .map(|b| PageBitmap::new(b.pages()))
        .collect();
    loop {
        let h = link.read_frame_if(|h| match h.kind {
            // decode() bounded the body (MAX_ZERO_MAP_BYTES) and matched it to the pages.
            Kind::ZeroMap => h.check_zero_map(layout),
            Kind::Run => Ok(()),
            got => Err(CodecError::Unexpected {
                got,
                expected: "ZeroMap or Run",
            }),
        })?;
        let Some(h) = h else {
            return Err(LinkError::Io {
                what: "read zero-page map",
                source: std::io::ErrorKind::UnexpectedEof.into(),
            });
        };
        if h.kind == Kind::Run {
            return Ok(map);
        }
        for i in 0..h.mask {
            if page_bit(link.body(), i) {
                map[h.block as usize].set(h.page + i);
            }
        }
    }
}

/// Handshakes with the source: returns the session and its layout.
pub fn connect(config: &EngineConfig) -> Result<Connected, DestError> {
    if config.workers == 0 || config.workers > 256 {
        return Err(DestError::Unsupported(format!(
            "{} workers (use 1..=256)",
            config.workers
        )));
    }
    let opened = open_connection(config, 0, Role::Urgent, 0)?;
    Ok(Connected {
        welcome: opened.welcome,
        control: opened.link,
        zero_map: opened.zero_map,
        precopy: config.precopy,
    })
}

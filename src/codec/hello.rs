//! The `Hello` that opens every connection: its header fields (the session id in `page`, the
//! role in `block`, the worker index in `count`, the worker count and the flags in `mask`) and
//! the typed view [`Hello`].

use super::{
    Header, Kind, Role, HELLO_CREDIT, HELLO_PAGE_SHIFT, HELLO_PRECOPY, HELLO_RESUME, HELLO_ZERO_MAP,
};

/// A `Hello`, field by field (its header carries the session id in `page`, the role in
/// `block`, the worker index in `count`, the worker count and the flags in `mask`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The session to join; 0 starts a new one.
    pub session: u64,
    /// What the connection carries.
    pub role: Role,
    /// The destination worker it belongs to.
    pub worker: u16,
    /// The destination's worker count.
    pub workers: u16,
    /// Send the zero-page map after `Welcome`.
    pub zero_map: bool,
    /// Precopy first.
    pub precopy: bool,
    /// Rejoining the session after a break.
    pub resume: bool,
    /// A bulk connection whose stream waits for the destination's `Credit`.
    pub credit: bool,
    /// The page size the destination's memory maps (`None`: any).
    pub page_size: Option<u64>,
}

impl Hello {
    /// The fields of a decoded `Hello` header (`decode` checked its role and worker count).
    pub fn of(h: &Header) -> Option<Hello> {
        if h.kind != Kind::Hello {
            return None;
        }
        Some(Hello {
            session: h.page,
            role: h.role()?,
            worker: h.count,
            workers: h.workers() as u16,
            zero_map: h.wants_zero_map(),
            precopy: h.wants_precopy(),
            resume: h.wants_resume(),
            credit: h.wants_credit(),
            page_size: h.page_size(),
        })
    }
}

impl Header {
    /// `Hello` for a connection of `role`, from worker `worker` of `workers`, joining
    /// `session` (0 asks the source for a new session).
    pub fn hello(session: u64, role: Role, worker: u16, workers: u16) -> Header {
        Header {
            count: worker,
            block: match role {
                Role::Urgent => 0,
                Role::Bulk => 1,
                Role::Verify => 2,
            },
            page: session,
            mask: u64::from(workers),
            ..Header::bare(Kind::Hello)
        }
    }

    /// Asks (in a `Hello`) for the zero-page map after `Welcome`.
    pub fn with_zero_map(mut self) -> Header {
        debug_assert_eq!(self.kind, Kind::Hello);
        self.mask |= HELLO_ZERO_MAP;
        self
    }

    /// Offers (in a `Hello`) a precopy phase after `Welcome`.
    pub fn with_precopy(mut self) -> Header {
        debug_assert_eq!(self.kind, Kind::Hello);
        self.mask |= HELLO_PRECOPY;
        self
    }

    /// Marks (in a `Hello`) a connection that rejoins its session after a break.
    pub fn with_resume(mut self) -> Header {
        debug_assert_eq!(self.kind, Kind::Hello);
        self.mask |= HELLO_RESUME;
        self
    }

    /// Marks (in a bulk connection's `Hello`) a stream driven by the destination's `Credit`.
    pub fn with_credit(mut self) -> Header {
        debug_assert_eq!(self.kind, Kind::Hello);
        self.mask |= HELLO_CREDIT;
        self
    }

    /// Says the destination's memory maps pages of `bytes` (a power of two below 2^64).
    pub fn with_page_size(mut self, bytes: u64) -> Header {
        debug_assert_eq!(self.kind, Kind::Hello);
        assert!(bytes.is_power_of_two(), "a page size is a power of two");
        self.mask |= u64::from(bytes.trailing_zeros()) << HELLO_PAGE_SHIFT;
        self
    }

    /// The page size the destination's memory maps, if it said.
    pub fn page_size(&self) -> Option<u64> {
        let shift = (self.mask >> HELLO_PAGE_SHIFT) & 0x7f;
        (shift != 0 && shift < 64).then(|| 1u64 << shift)
    }

    /// Whether a `Hello` asks for a credit-driven stream.
    pub fn wants_credit(&self) -> bool {
        self.mask & HELLO_CREDIT != 0
    }

    /// Whether a `Hello` rejoins after a break.
    pub fn wants_resume(&self) -> bool {
        self.mask & HELLO_RESUME != 0
    }

    /// Whether a `Hello` offers a precopy phase.
    pub fn wants_precopy(&self) -> bool {
        self.mask & HELLO_PRECOPY != 0
    }

    /// Whether a `Hello` asks for the zero-page map.
    pub fn wants_zero_map(&self) -> bool {
        self.mask & HELLO_ZERO_MAP != 0
    }

    /// The worker count of a `Hello`.
    pub fn workers(&self) -> u64 {
        self.mask & 0xffff_ffff
    }

    /// The role of a `Hello`.
    pub fn role(&self) -> Option<Role> {
        match self.block {
            0 => Some(Role::Urgent),
            1 => Some(Role::Bulk),
            2 => Some(Role::Verify),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The typed view reads back every field a `Hello` was built with, through the wire bytes.
    #[test]
    fn hello_view_round_trips() {
        for role in [Role::Urgent, Role::Bulk, Role::Verify] {
            for (session, worker, workers) in [(0, 0, 1), (0x51, 3, 4), (u64::MAX - 1, 255, 256)] {
                for flags in 0..32u8 {
                    let mut h = Header::hello(session, role, worker, workers);
                    if flags & 1 != 0 {
                        h = h.with_zero_map();
                    }
                    if flags & 2 != 0 {
                        h = h.with_precopy();
                    }
                    if flags & 4 != 0 {
                        h = h.with_resume();
                    }
                    if flags & 8 != 0 {
                        h = h.with_credit();
                    }
                    let page_size = (flags & 16 != 0).then_some(2u64 << 20);
                    if let Some(p) = page_size {
                        h = h.with_page_size(p);
                    }
                    let mut bytes = [0u8; crate::codec::HEADER_BYTES];
                    h.encode(&mut bytes);
                    let decoded = Header::decode(&bytes).expect("a valid Hello");
                    let want = Hello {
                        session,
                        role,
                        worker,
                        workers,
                        zero_map: flags & 1 != 0,
                        precopy: flags & 2 != 0,
                        resume: flags & 4 != 0,
                        credit: flags & 8 != 0,
                        page_size,
                    };
                    assert_eq!(Hello::of(&decoded), Some(want));
                }
            }
        }
        assert_eq!(
            Hello::of(&Header::control(Kind::Run, 0)),
            None,
            "not a Hello"
        );
    }
}

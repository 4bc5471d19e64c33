//! The oracle check: a seeded random differential between real Xen and the
//! Xen model. The same code draws `N` requests from a seed and applies them
//! to a small pool of the guest's own frames, under real Xen in the guest
//! kernel and against the Xen model (`pvmmu::model`, feature `model`) on
//! the host; each request prints one
//! `ORACLE <i> <answers> <entries> #<hash>` line, and the harness compares
//! the two transcripts line for line.
//!
//! The requests: `mmu_update` of any pool frame's entries (whatever level
//! the frame has become) with random flags and targets, singly and in
//! batches (the flags include every cache attribute, PWT, PCD and PAT, on
//! frames the kernel also maps write-back); pin of every level and unpin;
//! `MMUEXT_NEW_BASEPTR`; `MMUEXT_FLUSH_CACHE` and `_GLOBAL` (Xen runs them
//! only for a domain with I/O capabilities); `update_va_mapping` of one
//! live-tree slot (the window); multicalls mixing them. The targets are pool frames, a frame the guest does not
//! own (Xen's), and the live root. The states arise from the requests
//! themselves: empty or filled data frames, tables of each level (pinned,
//! or held by another pool table), frames mapped writable by a pool L1 or
//! by the window, linear (same-level, read-only) entries.
//!
//! What a line shows: each hypercall's answer (`OK`, the errno name,
//! `EINVAL@2` for a batch refused at request 2, `SKIP` for a request the
//! safety rule below withheld), the entries the request wrote as they read
//! back afterwards (frame tokens instead of machine frames: `p3` pool frame
//! 3, `f` the foreign frame, `r` the live root, `x` any other), and a hash
//! of every pool entry the requests can touch and of the window. A
//! frame's page type is not readable by a PV guest: it shows in the
//! answers of later requests (pins, writable mappings, hooks).
//!
//! # Safety of the guest
//! Invariant: no request can change a mapping or a table outside the pool,
//! whatever Xen answers:
//! * every `mmu_update` names a pool frame or the foreign frame (which Xen
//!   refuses) as the table to write; never a frame of the live tree;
//! * every entry points to a pool frame, the foreign frame or the live
//!   root, so a writable mapping can only ever pin a pool frame's type
//!   (the live root is a table: Xen refuses a writable mapping of it);
//! * pins and unpins name pool frames or the foreign frame, never a live
//!   table;
//! * the only live-tree entry written is the window's, a slot the
//!   environment reserves for the suite (see [`OracleEnv::window_va`]);
//!   `update_va_mapping` elsewhere names addresses Xen refuses (its hole, a
//!   lower-half address whose L4 slot is empty);
//! * `MMUEXT_NEW_BASEPTR` to a pool frame is sent, paired with the switch
//!   back in the same `mmuext_op` batch, only when that frame holds the
//!   live root's every present guest L4 entry (the `mirror` request copies
//!   them): if Xen accepts it (and runs the guest between the two, e.g. on
//!   a preemption), the guest sees its whole address space unchanged (as
//!   long as nothing fills a new L4 slot of the live root meanwhile: the
//!   kernel runs the oracle after its other work, when nothing does). A
//!   pool L4 cannot be an L1..L3 with those entries (Xen refuses to type
//!   it so), and the requests' own entry indices ([`INDICES`]) never
//!   overlap a mirrored slot (checked at setup), so only `mirror` and
//!   `unmirror` change them;
//! * the pool's own kernel aliases are read-only for the whole run (so
//!   the frames can become tables) and the guest never stores to them.
//!
//! At the end every pool frame is unpinned and emptied, the window gets
//! its entry back, and each frame is handed back writable; a frame Xen
//! still holds as a table is never handed back (counted as leaked).

use core::fmt;

use hypercall::abi::{mmu_update, mmuext_op, UVMF_ALL, UVMF_INVLPG, UVMF_TLB_FLUSH};
use hypercall::{Call, MmuExt, PinLevel, XenError};

use crate::negative::NegativeEnv;
use crate::types::{Mfn, Pfn, ENTRIES, ENTRY_FRAME_MASK, XEN_HOLE};

/// Frames in the pool.
pub const POOL: usize = 8;
/// Entry indices the requests write (the last one is Xen's first L4 slot).
pub const INDICES: [usize; 5] = [0, 1, 2, 3, 256];
/// Requests each Xen boot runs.
pub const DEFAULT_REQUESTS: u32 = 10_000;
/// Most steps in one batch or multicall.
pub const MAX_STEPS: usize = 4;
/// Most live-root L4 slots a `mirror` copies.
pub const MAX_MIRROR: usize = 16;
/// Marker of a request line.
pub const MARKER: &str = "ORACLE ";

/// Entry bits the lines print besides bits 0..12: bit 52 (Xen's
/// guest-kernel bit) as 0x1000 and bit 63 (NX) as 0x2000.
const GUEST_KERNEL: u64 = 1 << 52;
const NX: u64 = 1 << 63;
/// Xen's L4 slots (256..=271), never mirrored.
const XEN_SLOTS: core::ops::RangeInclusive<usize> = 256..=271;

/// What the oracle needs besides the negative suite's environment.
pub trait OracleEnv: NegativeEnv {
    /// A virtual address of the live tree whose L1 entry (present table
    /// path, any entry) the suite may rewrite freely with
    /// `update_va_mapping` until the end of the run, when it gets its entry
    /// back: nothing else may use the address meanwhile. `None` if there is
    /// none.
    fn window_va(&mut self) -> Option<u64>;

    /// Called after each request with the pool's machine frames (a
    /// tracing environment prints what it knows of them; the default does
    /// nothing).
    fn after_request(&mut self, _index: u32, _pool: &[u64; POOL]) {}
}

/// SplitMix64: small, seedable, the same on every target.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with `percent` per cent probability.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// A frame a request names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// Pool frame `n` (`n < POOL`).
    Pool(u8),
    /// A frame the guest does not own (Xen's).
    Foreign,
    /// The live root (only ever as an entry's target or a base pointer).
    Root,
}

/// An entry value a request writes: zero, or a target with flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pte {
    /// Where it points; `None` for the zero entry.
    pub target: Option<Frame>,
    /// Flag bits (0..12, 52, 63).
    pub flags: u64,
}

/// Where an `update_va_mapping` points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Va {
    /// The environment's window.
    Window,
    /// An address in Xen's hole.
    Hole,
    /// A lower-half address whose L4 slot is empty.
    Unmapped,
}

/// One hypercall-level action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// `mmu_update` of entry `index` of `frame` (a pool frame or the
    /// foreign one) with command `cmd` (0 normal, 2 preserve A/D, 7 bad).
    Write {
        /// The table written.
        frame: Frame,
        /// Entry index.
        index: u16,
        /// Command in the low bits of `ptr`.
        cmd: u8,
        /// New value.
        pte: Pte,
    },
    /// `MMUEXT_PIN_L<level>_TABLE`.
    Pin {
        /// The frame pinned.
        frame: Frame,
        /// 1..=4.
        level: u8,
    },
    /// `MMUEXT_UNPIN_TABLE`.
    Unpin {
        /// The frame unpinned.
        frame: Frame,
    },
    /// `MMUEXT_FLUSH_CACHE`, or `MMUEXT_FLUSH_CACHE_GLOBAL` when `global`.
    FlushCache {
        /// Every physical CPU's caches, not the current one's.
        global: bool,
    },
    /// `update_va_mapping(va, pte, flags)`.
    Uvm {
        /// The address.
        va: Va,
        /// The new L1 entry.
        pte: Pte,
        /// `UVMF_*` flags.
        flags: u64,
    },
}

/// One request: what one line reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// One step as its own hypercall.
    One(Step),
    /// One `mmu_update` call with `n` writes (only `Step::Write`s).
    Batch([Step; MAX_STEPS], u8),
    /// `NEW_BASEPTR(frame)` then `NEW_BASEPTR(root)` in one `mmuext_op`.
    NewBaseptr(Frame),
    /// Copies the live root's present guest L4 entries into pool frame `n`
    /// (one `mmu_update` batch).
    Mirror(u8),
    /// Clears those slots of pool frame `n`.
    Unmirror(u8),
    /// A multicall of `n` steps, each its own call.
    Multi([Step; MAX_STEPS], u8),
}

/// The request generator: the same seed gives the same requests on every
/// target, independent of any answer.
#[derive(Debug, Clone)]
pub struct Requests {
    rng: Rng,
}

impl Requests {
    /// The requests of `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            rng: Rng::new(seed),
        }
    }

    fn pool(&mut self) -> Frame {
        Frame::Pool(self.rng.below(POOL as u64) as u8)
    }

    fn pool_or_foreign(&mut self, foreign_percent: u64) -> Frame {
        if self.rng.chance(foreign_percent) {
            Frame::Foreign
        } else {
            self.pool()
        }
    }

    fn pte(&mut self) -> Pte {
        if self.rng.chance(20) {
            return Pte {
                target: None,
                flags: 0,
            };
        }
        let target = match self.rng.below(100) {
            0..=84 => self.pool(),
            85..=92 => Frame::Foreign,
            _ => Frame::Root,
        };
        // (bit, per cent): P, RW, USER, PWT, PCD, A, D, PSE/PAT, G, NX.
        const BITS: [(u64, u64); 10] = [
            (1 << 0, 90),
            (1 << 1, 50),
            (1 << 2, 15),
            (1 << 3, 5),
            (1 << 4, 5),
            (1 << 5, 15),
            (1 << 6, 10),
            (1 << 7, 5),
            (1 << 8, 5),
            (NX, 15),
        ];
        let mut flags = 0;
        for (bit, percent) in BITS {
            if self.rng.chance(percent) {
                flags |= bit;
            }
        }
        Pte {
            target: Some(target),
            flags,
        }
    }

    fn write(&mut self) -> Step {
        let frame = self.pool_or_foreign(3);
        let index = match self.rng.below(100) {
            0..=91 => INDICES[self.rng.below(4) as usize],
            _ => INDICES[4],
        } as u16;
        let cmd = match self.rng.below(100) {
            0..=89 => 0,
            90..=96 => 2,
            _ => 7,
        };
        Step::Write {
            frame,
            index,
            cmd,
            pte: self.pte(),
        }
    }

    fn uvm(&mut self) -> Step {
        let va = match self.rng.below(100) {
            0..=89 => Va::Window,
            90..=94 => Va::Hole,
            _ => Va::Unmapped,
        };
        const FLAGS: [u64; 4] = [0, UVMF_INVLPG, UVMF_TLB_FLUSH, UVMF_INVLPG | UVMF_ALL];
        Step::Uvm {
            va,
            pte: self.pte(),
            flags: FLAGS[self.rng.below(4) as usize],
        }
    }

    fn flush_cache(&mut self) -> Step {
        Step::FlushCache {
            global: self.rng.chance(50),
        }
    }

    fn step(&mut self) -> Step {
        match self.rng.below(100) {
            0..=44 => self.write(),
            45..=62 => Step::Pin {
                frame: self.pool_or_foreign(5),
                level: 1 + self.rng.below(4) as u8,
            },
            63..=64 => self.flush_cache(),
            65..=79 => Step::Unpin {
                frame: self.pool_or_foreign(5),
            },
            _ => self.uvm(),
        }
    }

    fn steps(&mut self, mut one: impl FnMut(&mut Self) -> Step) -> ([Step; MAX_STEPS], u8) {
        let n = 2 + self.rng.below(MAX_STEPS as u64 - 1) as usize;
        let mut steps = [Step::Unpin {
            frame: Frame::Foreign,
        }; MAX_STEPS];
        for s in &mut steps[..n] {
            *s = one(self);
        }
        (steps, n as u8)
    }

    /// The next request.
    pub fn next_request(&mut self) -> Request {
        match self.rng.below(100) {
            0..=34 => Request::One(self.write()),
            35..=44 => {
                let (steps, n) = self.steps(Self::write);
                Request::Batch(steps, n)
            }
            45..=55 => Request::One(Step::Pin {
                frame: self.pool_or_foreign(5),
                level: 1 + self.rng.below(4) as u8,
            }),
            56..=57 => Request::One(self.flush_cache()),
            58..=67 => Request::One(Step::Unpin {
                frame: self.pool_or_foreign(5),
            }),
            68..=71 => Request::NewBaseptr(match self.rng.below(100) {
                0..=84 => self.pool(),
                85..=89 => Frame::Root,
                _ => Frame::Foreign,
            }),
            72..=74 => Request::Mirror(self.rng.below(POOL as u64) as u8),
            75..=78 => Request::Unmirror(self.rng.below(POOL as u64) as u8),
            79..=88 => Request::One(self.uvm()),
            _ => {
                let (steps, n) = self.steps(Self::step);
                Request::Multi(steps, n)
            }
        }
    }
}

/// What one hypercall (or one call of a multicall) answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Accepted.
    Ok,
    /// Refused.
    Err(XenError),
    /// A batch refused at request `done` (the first `done` applied).
    Partial(usize, XenError),
    /// Not sent: the safety rule withheld it (a base pointer to a frame
    /// without the live root's entries).
    Skip,
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Answer::Ok => write!(f, "OK"),
            Answer::Err(e) => write!(f, "{}", e.name()),
            Answer::Partial(done, e) => write!(f, "{}@{done}", e.name()),
            Answer::Skip => write!(f, "SKIP"),
        }
    }
}

/// An entry as a line shows it: a frame token and the flag bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// Pool frame written (`None`: the window).
    pub frame: Option<u8>,
    /// Its entry index.
    pub index: u16,
    /// Token of the frame the entry points to: 0 none (zero frame
    /// bits), 1..=POOL pool frame n-1, 100 foreign, 101 root, 102 other.
    pub token: u8,
    /// Bits 0..12, plus 0x1000 for bit 52 and 0x2000 for NX.
    pub flags: u16,
}

impl Seen {
    /// The window's entry 0, empty: what an unused slot of a line holds.
    pub const NONE: Seen = Seen {
        frame: None,
        index: 0,
        token: 0,
        flags: 0,
    };
}

const TOKEN_FOREIGN: u8 = 100;
const TOKEN_ROOT: u8 = 101;
const TOKEN_OTHER: u8 = 102;

impl fmt::Display for Seen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.frame {
            Some(n) => write!(f, "p{n}.{}=", self.index)?,
            None => write!(f, "w=")?,
        }
        if self.token == 0 && self.flags == 0 {
            return write!(f, "-");
        }
        match self.token {
            0 => write!(f, "0")?,
            TOKEN_FOREIGN => write!(f, "f")?,
            TOKEN_ROOT => write!(f, "r")?,
            TOKEN_OTHER => write!(f, "x")?,
            n => write!(f, "p{}", n - 1)?,
        }
        write!(f, ":{:x}", self.flags)
    }
}

/// One line of output: `ORACLE <i> <answers> [<entries>] #<hash>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Line {
    /// Request number (from 0).
    pub index: u32,
    /// One answer per hypercall (per call of a multicall).
    pub answers: [Answer; MAX_STEPS],
    /// How many of `answers` count.
    pub n_answers: u8,
    /// The entries the request wrote, read back.
    pub seen: [Seen; MAX_STEPS],
    /// How many of `seen` count.
    pub n_seen: u8,
    /// FNV-1a over every pool entry at [`INDICES`] and the window entry.
    pub hash: u32,
}

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{MARKER}{} ", self.index)?;
        for (i, a) in self.answers[..usize::from(self.n_answers)]
            .iter()
            .enumerate()
        {
            if i > 0 {
                write!(f, ",")?;
            }
            write!(f, "{a}")?;
        }
        for s in &self.seen[..usize::from(self.n_seen)] {
            write!(f, " {s}")?;
        }
        write!(f, " #{:08x}", self.hash)
    }
}

/// Requests per `ORACLE-BLOCK` line.
pub const BLOCK: u32 = 100;

/// One `ORACLE-BLOCK <first> <count> #<hash>` line: FNV-1a (64-bit) over
/// the text of `count` request lines from request `first` on, each with
/// its newline. The kernel prints these instead of the request lines
/// unless asked for every line; the model's replay computes the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLine {
    /// First request of the block.
    pub first: u32,
    /// Requests in it.
    pub count: u32,
    /// The hash of their lines.
    pub hash: u64,
}

impl fmt::Write for BlockLine {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            self.hash ^= u64::from(b);
            self.hash = self.hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        Ok(())
    }
}

impl fmt::Display for BlockLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ORACLE-BLOCK {} {} #{:016x}",
            self.first, self.count, self.hash
        )
    }
}

/// Folds request lines into [`BlockLine`]s of [`BLOCK`] requests.
#[derive(Debug, Clone)]
pub struct Blocks {
    current: BlockLine,
}

impl Default for Blocks {
    fn default() -> Self {
        Self::new()
    }
}

impl Blocks {
    const EMPTY: BlockLine = BlockLine {
        first: 0,
        count: 0,
        hash: 0xcbf2_9ce4_8422_2325,
    };

    /// No line yet.
    pub fn new() -> Self {
        Self {
            current: Self::EMPTY,
        }
    }

    /// Adds `line`; returns the block it completes, if it does.
    pub fn push(&mut self, line: &Line) -> Option<BlockLine> {
        use fmt::Write;
        if self.current.count == 0 {
            self.current.first = line.index;
        }
        let _ = writeln!(self.current, "{line}");
        self.current.count += 1;
        (self.current.count == BLOCK).then(|| self.take())
    }

    /// The last, incomplete block, if any.
    pub fn finish(&mut self) -> Option<BlockLine> {
        (self.current.count > 0).then(|| self.take())
    }

    fn take(&mut self) -> BlockLine {
        core::mem::replace(&mut self.current, Self::EMPTY)
    }
}

/// The run's header line: `ORACLE-BEGIN seed=<hex> requests=<n>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Begin {
    /// The seed.
    pub seed: u64,
    /// Requests to run.
    pub requests: u32,
}

impl fmt::Display for Begin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ORACLE-BEGIN seed={:#x} requests={}",
            self.seed, self.requests
        )
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The pool could not be set up (no line was printed before).
    Setup(XenError),
    /// `requests` ran; `leaked` pool frames stayed typed and were not given
    /// back.
    Done {
        /// Requests applied.
        requests: u32,
        /// Frames not given back.
        leaked: u32,
    },
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::Setup(e) => write!(f, "ORACLE-END setup {}", e.name()),
            End::Done { requests, leaked } => {
                write!(f, "ORACLE-END requests={requests} leaked={leaked}")
            }
        }
    }
}

/// The pool and the run's fixed frames.
struct Runner<'e> {
    env: &'e mut dyn OracleEnv,
    pfn: [Pfn; POOL],
    mfn: [u64; POOL],
    foreign: u64,
    root: u64,
    window: u64,
    mirror: [usize; MAX_MIRROR],
    n_mirror: usize,
}

fn step_result(r: Result<(), XenError>) -> Answer {
    match r {
        Ok(()) => Answer::Ok,
        Err(e) => Answer::Err(e),
    }
}

impl Runner<'_> {
    fn mfn(&self, frame: Frame) -> u64 {
        match frame {
            Frame::Pool(n) => self.mfn[usize::from(n) % POOL],
            Frame::Foreign => self.foreign,
            Frame::Root => self.root,
        }
    }

    fn val(&self, pte: Pte) -> u64 {
        match pte.target {
            None => 0,
            Some(t) => (self.mfn(t) << 12) | pte.flags,
        }
    }

    fn va(&self, va: Va) -> u64 {
        match va {
            Va::Window => self.window,
            Va::Hole => XEN_HOLE.0 + 0x1000,
            // Slot 1: empty in the live root (checked at setup).
            Va::Unmapped => 1 << 39,
        }
    }

    /// Entry `index` of the guest frame `mfn`, read through the guest's
    /// (read-only) alias.
    fn read(&self, mfn: u64, index: usize) -> Option<u64> {
        let pfn = self.env.frame_map().to_pfn(Mfn(mfn))?;
        let ptr = self.env.phys_mem().frame_ptr(pfn)?;
        // SAFETY: `ptr` is valid for 4 KiB of reads (PhysMem contract) and
        // `index < ENTRIES`.
        Some(unsafe {
            ptr.as_ptr()
                .cast::<u64>()
                .add(index % ENTRIES)
                .read_volatile()
        })
    }

    /// The L1 entry mapping `va` in the live tree, if the walk reaches one.
    fn leaf(&self, va: u64) -> Option<u64> {
        let mut table = self.root;
        for shift in [39u32, 30, 21] {
            let e = self.read(table, ((va >> shift) & 511) as usize)?;
            if e & 1 == 0 || e & (1 << 7) != 0 {
                return None;
            }
            table = (e & ENTRY_FRAME_MASK) >> 12;
        }
        self.read(table, ((va >> 12) & 511) as usize)
    }

    fn token(&self, e: u64) -> u8 {
        let mfn = (e & ENTRY_FRAME_MASK) >> 12;
        if let Some(n) = self.mfn.iter().position(|&m| m == mfn) {
            n as u8 + 1
        } else if mfn == 0 {
            0
        } else if mfn == self.foreign {
            TOKEN_FOREIGN
        } else if mfn == self.root {
            TOKEN_ROOT
        } else {
            TOKEN_OTHER
        }
    }

    fn seen(&self, frame: Option<u8>, index: u16, e: u64) -> Seen {
        let flags = (e & 0xfff)
            | if e & GUEST_KERNEL != 0 { 0x1000 } else { 0 }
            | if e & NX != 0 { 0x2000 } else { 0 };
        Seen {
            frame,
            index,
            token: self.token(e),
            flags: flags as u16,
        }
    }

    fn window_seen(&self) -> Seen {
        self.seen(None, 0, self.leaf(self.window).unwrap_or(0))
    }

    /// What a step wrote, read back (`None` for a step that writes no
    /// pool entry or window).
    fn step_seen(&self, step: &Step) -> Option<Seen> {
        match *step {
            Step::Write {
                frame: Frame::Pool(n),
                index,
                ..
            } => {
                let e = self.read(self.mfn(Frame::Pool(n)), usize::from(index))?;
                Some(self.seen(Some(n), index, e))
            }
            Step::Uvm { va: Va::Window, .. } => Some(self.window_seen()),
            _ => None,
        }
    }

    fn hash(&self) -> u32 {
        let mut h: u32 = 0x811c_9dc5;
        let mut eat = |b: u8| {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        };
        for n in 0..POOL {
            for index in INDICES {
                let e = self.read(self.mfn[n], index).unwrap_or(0);
                let s = self.seen(Some(n as u8), index as u16, e);
                eat(s.token);
                for b in s.flags.to_le_bytes() {
                    eat(b);
                }
            }
        }
        let s = self.window_seen();
        eat(s.token);
        for b in s.flags.to_le_bytes() {
            eat(b);
        }
        h
    }

    fn mmu_req(&self, step: &Step) -> mmu_update {
        match *step {
            Step::Write {
                frame,
                index,
                cmd,
                pte,
            } => mmu_update {
                ptr: (self.mfn(frame) << 12)
                    + u64::from(index % ENTRIES as u16) * 8
                    + u64::from(cmd & 7),
                val: self.val(pte),
            },
            // Only writes go to mmu_update.
            _ => mmu_update { ptr: 7, val: 0 },
        }
    }

    fn ext_op(&self, step: &Step) -> mmuext_op {
        match *step {
            Step::Pin { frame, level } => MmuExt::Pin {
                level: match level {
                    1 => PinLevel::L1,
                    2 => PinLevel::L2,
                    3 => PinLevel::L3,
                    _ => PinLevel::L4,
                },
                mfn: self.mfn(frame),
            }
            .encode(),
            Step::Unpin { frame } => MmuExt::Unpin {
                mfn: self.mfn(frame),
            }
            .encode(),
            Step::FlushCache { global: false } => MmuExt::FlushCache.encode(),
            Step::FlushCache { global: true } => MmuExt::FlushCacheGlobal.encode(),
            _ => MmuExt::TlbFlushLocal.encode(),
        }
    }

    fn batch(&mut self, reqs: &[mmu_update]) -> Answer {
        match self.env.hypercalls().mmu_update(reqs) {
            Ok(()) => Answer::Ok,
            Err(e) if reqs.len() > 1 => Answer::Partial(e.done, e.error),
            Err(e) => Answer::Err(e.error),
        }
    }

    fn one(&mut self, step: &Step) -> Answer {
        match *step {
            Step::Write { .. } => {
                let req = self.mmu_req(step);
                self.batch(&[req])
            }
            Step::Pin { .. } | Step::Unpin { .. } | Step::FlushCache { .. } => {
                let op = self.ext_op(step);
                step_result(self.env.hypercalls().mmuext_op(&[op]).map_err(|e| e.error))
            }
            Step::Uvm { va, pte, flags } => {
                let (va, val) = (self.va(va), self.val(pte));
                step_result(self.env.hypercalls().update_va_mapping(va, val, flags))
            }
        }
    }

    /// Whether pool frame `n` holds every present guest entry of the live
    /// root (same frame, present): the condition for sending it as a base
    /// pointer (see the module's safety notes).
    fn mirrors_root(&self, n: u8) -> bool {
        let frame = self.mfn(Frame::Pool(n));
        self.mirror[..self.n_mirror].iter().all(|&slot| {
            match (self.read(self.root, slot), self.read(frame, slot)) {
                (Some(want), Some(got)) => {
                    got & 1 != 0 && (got & ENTRY_FRAME_MASK) == (want & ENTRY_FRAME_MASK)
                }
                _ => false,
            }
        })
    }

    fn apply(&mut self, index: u32, request: &Request) -> Line {
        let mut line = Line {
            index,
            answers: [Answer::Skip; MAX_STEPS],
            n_answers: 1,
            seen: [Seen::NONE; MAX_STEPS],
            n_seen: 0,
            hash: 0,
        };
        let push_seen = |line: &mut Line, s: Option<Seen>| {
            if let Some(s) = s {
                if usize::from(line.n_seen) < MAX_STEPS {
                    line.seen[usize::from(line.n_seen)] = s;
                    line.n_seen += 1;
                }
            }
        };
        match request {
            Request::One(step) => {
                line.answers[0] = self.one(step);
                push_seen(&mut line, self.step_seen(step));
            }
            Request::Batch(steps, n) => {
                let steps = &steps[..usize::from(*n)];
                let mut reqs = [mmu_update { ptr: 0, val: 0 }; MAX_STEPS];
                for (r, s) in reqs.iter_mut().zip(steps) {
                    *r = self.mmu_req(s);
                }
                line.answers[0] = self.batch(&reqs[..steps.len()]);
                for s in steps {
                    push_seen(&mut line, self.step_seen(s));
                }
            }
            Request::NewBaseptr(frame) => {
                let safe = match frame {
                    Frame::Pool(n) => self.mirrors_root(*n),
                    Frame::Foreign | Frame::Root => true,
                };
                if safe {
                    let ops = [
                        MmuExt::NewBaseptr {
                            mfn: self.mfn(*frame),
                        }
                        .encode(),
                        MmuExt::NewBaseptr { mfn: self.root }.encode(),
                    ];
                    line.answers[0] = match self.env.hypercalls().mmuext_op(&ops) {
                        Ok(()) => Answer::Ok,
                        Err(e) => Answer::Partial(e.done, e.error),
                    };
                }
            }
            Request::Mirror(n) | Request::Unmirror(n) => {
                let frame = self.mfn(Frame::Pool(*n));
                let mut reqs = [mmu_update { ptr: 0, val: 0 }; MAX_MIRROR];
                for (r, &slot) in reqs.iter_mut().zip(&self.mirror[..self.n_mirror]) {
                    let val = match request {
                        Request::Mirror(_) => self.read(self.root, slot).unwrap_or(0),
                        _ => 0,
                    };
                    *r = mmu_update {
                        ptr: (frame << 12) + slot as u64 * 8,
                        val,
                    };
                }
                line.answers[0] = match self.env.hypercalls().mmu_update(&reqs[..self.n_mirror]) {
                    Ok(()) => Answer::Ok,
                    Err(e) => Answer::Partial(e.done, e.error),
                };
            }
            Request::Multi(steps, n) => {
                let steps = &steps[..usize::from(*n)];
                let mut reqs = [mmu_update { ptr: 0, val: 0 }; MAX_STEPS];
                let mut ops = [MmuExt::TlbFlushLocal.encode(); MAX_STEPS];
                for (i, s) in steps.iter().enumerate() {
                    reqs[i] = self.mmu_req(s);
                    ops[i] = self.ext_op(s);
                }
                let mut calls = [Call::MmuUpdate(&[]); MAX_STEPS];
                for (i, s) in steps.iter().enumerate() {
                    calls[i] = match *s {
                        Step::Write { .. } => Call::MmuUpdate(core::slice::from_ref(&reqs[i])),
                        Step::Pin { .. } | Step::Unpin { .. } | Step::FlushCache { .. } => {
                            Call::MmuExtOp(core::slice::from_ref(&ops[i]))
                        }
                        Step::Uvm { va, pte, flags } => Call::UpdateVaMapping {
                            va: self.va(va),
                            val: self.val(pte),
                            flags,
                        },
                    };
                }
                let mut results = [Ok(0); MAX_STEPS];
                let n = steps.len();
                line.n_answers = n as u8;
                match self
                    .env
                    .hypercalls()
                    .multicall(&calls[..n], &mut results[..n])
                {
                    Ok(()) => {
                        for (a, r) in line.answers.iter_mut().zip(&results[..n]) {
                            *a = match r {
                                Ok(_) => Answer::Ok,
                                Err(e) => Answer::Err(*e),
                            };
                        }
                    }
                    Err(e) => {
                        line.n_answers = 1;
                        line.answers[0] = Answer::Err(e);
                    }
                }
                for s in steps {
                    push_seen(&mut line, self.step_seen(s));
                }
            }
        }
        line.hash = self.hash();
        line
    }

    /// Unpins every pool frame and clears every entry the requests (and
    /// `mirror`) can have written, a few times over (a table held by
    /// another pool table stops being one when that entry goes). In the
    /// first passes each frame is also asked for each upper table type: a
    /// table Xen left half-validated resumes its validation that way and is
    /// cleaned up (or pinned, and unpinned by the next pass).
    fn empty_pool(&mut self) {
        const PASSES: usize = 4;
        for pass in 0..PASSES {
            for n in 0..POOL {
                let op = MmuExt::Unpin { mfn: self.mfn[n] }.encode();
                let _ = self.env.hypercalls().mmuext_op(&[op]);
            }
            for n in 0..POOL {
                let slots = INDICES
                    .iter()
                    .chain(self.mirror[..self.n_mirror].iter())
                    .copied();
                let mut reqs = [mmu_update { ptr: 0, val: 0 }; INDICES.len() + MAX_MIRROR];
                let mut k = 0;
                for slot in slots {
                    if self.read(self.mfn[n], slot).unwrap_or(0) != 0 {
                        reqs[k] = mmu_update {
                            ptr: (self.mfn[n] << 12) + slot as u64 * 8,
                            val: 0,
                        };
                        k += 1;
                    }
                }
                // One request at a time: a refused one (a Xen slot of an
                // L4) must not stop the others.
                for r in &reqs[..k] {
                    let _ = self.env.hypercalls().mmu_update(core::slice::from_ref(r));
                }
            }
            if pass + 1 < PASSES {
                for n in 0..POOL {
                    for level in [PinLevel::L2, PinLevel::L3, PinLevel::L4] {
                        let op = MmuExt::Pin {
                            level,
                            mfn: self.mfn[n],
                        }
                        .encode();
                        let _ = self.env.hypercalls().mmuext_op(&[op]);
                    }
                }
            }
        }
    }
}

/// Runs `requests` requests drawn from `seed` against `env`, reporting the
/// header, one line per request and the end through the three callbacks.
/// The environment must provide [`POOL`] frames; they are given back at
/// the end (see the module's notes on safety).
pub fn run(
    env: &mut dyn OracleEnv,
    seed: u64,
    requests: u32,
    begin: &mut dyn FnMut(Begin),
    out: &mut dyn FnMut(&Line),
    end: &mut dyn FnMut(End),
) {
    let mut pfn = [Pfn(0); POOL];
    let mut mfn = [0u64; POOL];
    let give_back = |env: &mut dyn OracleEnv, pfns: &[Pfn]| {
        for &p in pfns {
            env.free_frame(p);
        }
    };
    for i in 0..POOL {
        let Some(p) = env.allocate_frame() else {
            give_back(env, &pfn[..i]);
            return end(End::Setup(XenError::NoMem));
        };
        pfn[i] = p;
        let Some(m) = env.frame_map().to_mfn(p) else {
            give_back(env, &pfn[..=i]);
            return end(End::Setup(XenError::Inval));
        };
        mfn[i] = m.0;
    }
    let root = env.current_root().0;
    let Some(window) = env.window_va() else {
        give_back(env, &pfn);
        return end(End::Setup(XenError::NoEnt));
    };
    let mut r = Runner {
        env,
        pfn,
        mfn,
        foreign: 0,
        root,
        window,
        mirror: [0; MAX_MIRROR],
        n_mirror: 0,
    };
    // The foreign frame: what the root's L4 slot 261 (Xen's own image
    // mappings) points to, as in the negative suite.
    r.foreign = r
        .read(root, 261)
        .map_or(0, |e| (e & ENTRY_FRAME_MASK) >> 12);
    let mut setup = Ok(());
    for slot in (0..ENTRIES).filter(|s| !XEN_SLOTS.contains(s)) {
        let e = r.read(root, slot).unwrap_or(0);
        if e & 1 == 0 {
            continue;
        }
        // The requests' own indices and the unmapped address's slot must
        // not be live slots (see the safety notes).
        if INDICES.contains(&slot) || r.n_mirror == MAX_MIRROR {
            setup = Err(XenError::Inval);
            break;
        }
        r.mirror[r.n_mirror] = slot;
        r.n_mirror += 1;
    }
    let window_entry = r.leaf(window);
    if window_entry.is_none() || r.foreign == 0 {
        setup = Err(XenError::NoEnt);
    }
    let zero = |r: &mut Runner<'_>, n: usize| -> Result<(), XenError> {
        let p = r.pfn[n];
        r.env.set_alias_writable(p, true)?;
        let ptr = r.env.phys_mem().frame_ptr(p).ok_or(XenError::Fault)?;
        for i in 0..ENTRIES {
            // SAFETY: `ptr` is valid for 4 KiB of writes (PhysMem
            // contract): the frame was just allocated to us, is no table,
            // and its alias is writable.
            unsafe { ptr.as_ptr().cast::<u64>().add(i).write_volatile(0) };
        }
        r.env.set_alias_writable(p, false)
    };
    for n in 0..POOL {
        if setup.is_ok() {
            setup = zero(&mut r, n);
        }
    }
    if setup.is_ok() {
        setup = r.env.hypercalls().update_va_mapping(window, 0, UVMF_INVLPG);
    }
    if let Err(e) = setup {
        for n in 0..POOL {
            let p = r.pfn[n];
            let _ = r.env.set_alias_writable(p, true);
            r.env.free_frame(p);
        }
        return end(End::Setup(e));
    }

    begin(Begin { seed, requests });
    let mut gen = Requests::new(seed);
    for i in 0..requests {
        let request = gen.next_request();
        let line = r.apply(i, &request);
        out(&line);
        let pool = r.mfn;
        r.env.after_request(i, &pool);
    }

    r.empty_pool();
    let _ = r
        .env
        .hypercalls()
        .update_va_mapping(window, window_entry.unwrap_or(0), UVMF_INVLPG);
    let mut leaked = 0;
    for n in 0..POOL {
        let p = r.pfn[n];
        // Xen refuses a writable alias of a frame it still holds as a
        // table: such a frame must never go back to the allocator.
        match r.env.set_alias_writable(p, true) {
            Ok(()) => r.env.free_frame(p),
            Err(_) => leaked += 1,
        }
    }
    end(End::Done { requests, leaked });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_draws_the_same_requests() {
        let (mut a, mut b) = (Requests::new(7), Requests::new(7));
        let mut c = Requests::new(8);
        let mut differs = 0;
        for _ in 0..10_000 {
            let (x, y, z) = (a.next_request(), b.next_request(), c.next_request());
            assert_eq!(x, y);
            differs += usize::from(x != z);
        }
        assert!(
            differs > 5_000,
            "seeds 7 and 8 differ in {differs} requests"
        );
    }

    #[test]
    fn every_kind_of_request_is_drawn() {
        let mut g = Requests::new(1);
        let mut kinds = [0usize; 11];
        for _ in 0..10_000 {
            let k = match g.next_request() {
                Request::One(Step::Write { .. }) => 0,
                Request::One(Step::Pin { level, .. }) => level as usize,
                Request::One(Step::Unpin { .. }) => 5,
                Request::One(Step::Uvm { .. }) => 6,
                Request::Batch(..) | Request::Multi(..) => 7,
                Request::NewBaseptr(_) | Request::Mirror(_) | Request::Unmirror(_) => 8,
                Request::One(Step::FlushCache { global: false }) => 9,
                Request::One(Step::FlushCache { global: true }) => 10,
            };
            kinds[k] += 1;
        }
        assert!(kinds.iter().all(|&n| n > 100), "{kinds:?}");
    }

    #[test]
    fn a_run_against_the_model_gives_everything_back() {
        use crate::model::{DomainKind, ModelNegativeEnv};
        for seed in 1..=4 {
            let mut env = ModelNegativeEnv::new(DomainKind::Hardware, 4096).unwrap();
            let m = env.model();
            let (root, tables, count) = (
                m.current_root().unwrap(),
                m.live_tables(),
                m.type_count(m.current_root().unwrap()),
            );
            let (mut lines, mut end) = (0, None);
            run(
                &mut env,
                seed,
                3_000,
                &mut |_| {},
                &mut |_| lines += 1,
                &mut |e| end = Some(e),
            );
            assert_eq!(lines, 3_000);
            assert_eq!(
                end,
                Some(End::Done {
                    requests: 3_000,
                    leaked: 0
                }),
                "seed {seed}"
            );
            let m = env.model();
            assert_eq!(m.current_root(), Some(root));
            assert!(m.is_pinned(root));
            assert_eq!(m.type_count(root), count);
            assert_eq!(m.live_tables(), tables, "seed {seed}");
            assert_eq!(m.stuck_tables().count(), 0);
            assert_eq!(m.check_integrity(), Ok(()));
        }
    }

    #[test]
    fn the_requests_reach_every_answer() {
        use crate::model::{DomainKind, ModelNegativeEnv};
        let mut env = ModelNegativeEnv::new(DomainKind::Hardware, 4096).unwrap();
        let mut seen = alloc::collections::BTreeSet::new();
        let mut based = 0;
        run(
            &mut env,
            7,
            10_000,
            &mut |_| {},
            &mut |line| {
                for a in &line.answers[..usize::from(line.n_answers)] {
                    seen.insert(alloc::format!("{a}").replace(|c: char| c.is_ascii_digit(), ""));
                }
                based += usize::from(line.n_answers == 1 && line.answers[0] == Answer::Ok);
            },
            &mut |_| {},
        );
        for want in ["OK", "EINVAL", "EBUSY", "ENOSYS", "EINVAL@", "SKIP"] {
            assert!(seen.contains(want), "{want} never answered: {seen:?}");
        }
        assert!(based > 1_000);
    }

    #[test]
    fn a_domain_without_io_caps_is_refused_its_cache_flushes() {
        use crate::model::{DomainKind, ModelNegativeEnv};
        let answers = |kind| {
            let mut env = ModelNegativeEnv::new(kind, 4096).unwrap();
            let mut seen = alloc::collections::BTreeSet::new();
            run(
                &mut env,
                11,
                2_000,
                &mut |_| {},
                &mut |line| {
                    for a in &line.answers[..usize::from(line.n_answers)] {
                        seen.insert(alloc::format!("{a}"));
                    }
                },
                &mut |_| {},
            );
            (seen, env.model().cache_flushes())
        };
        let (domu, flushed) = answers(DomainKind::Unprivileged);
        assert!(domu.contains("EACCES"), "{domu:?}");
        assert_eq!(flushed, crate::model::CacheFlushes::default());
        let (dom0, flushed) = answers(DomainKind::Hardware);
        assert!(!dom0.contains("EACCES"), "{dom0:?}");
        assert!(flushed.local > 10 && flushed.global > 10, "{flushed:?}");
    }

    #[test]
    fn blocks_hash_the_text_of_their_lines() {
        let line = |index: u32, hash: u32| Line {
            index,
            answers: [Answer::Ok; MAX_STEPS],
            n_answers: 1,
            seen: [Seen::NONE; MAX_STEPS],
            n_seen: 0,
            hash,
        };
        let fold = |lines: &[Line]| {
            let mut b = Blocks::new();
            let mut out: alloc::vec::Vec<BlockLine> =
                lines.iter().filter_map(|l| b.push(l)).collect();
            out.extend(b.finish());
            out
        };
        let lines: alloc::vec::Vec<Line> = (0..250).map(|i| line(i, i)).collect();
        let blocks = fold(&lines);
        assert_eq!(
            blocks
                .iter()
                .map(|b| (b.first, b.count))
                .collect::<alloc::vec::Vec<_>>(),
            [(0, 100), (100, 100), (200, 50)]
        );
        // One line different: only its block's hash changes.
        let mut other = lines.clone();
        other[150].hash = 1;
        let changed = fold(&other);
        assert_eq!(changed[0], blocks[0]);
        assert_ne!(changed[1], blocks[1]);
        assert_eq!(changed[2], blocks[2]);
        assert!(alloc::format!("{}", blocks[2]).starts_with("ORACLE-BLOCK 200 50 #"));
    }

    #[test]
    fn line_format() {
        let mut line = Line {
            index: 3,
            answers: [Answer::Skip; MAX_STEPS],
            n_answers: 2,
            seen: [Seen {
                frame: Some(2),
                index: 1,
                token: 6,
                flags: 0x1067,
            }; MAX_STEPS],
            n_seen: 1,
            hash: 0xabc,
        };
        line.answers[0] = Answer::Partial(1, XenError::Inval);
        line.answers[1] = Answer::Ok;
        line.seen[1] = Seen::NONE;
        line.n_seen = 2;
        assert_eq!(
            alloc::format!("{line}"),
            "ORACLE 3 EINVAL@1,OK p2.1=p5:1067 w=- #00000abc"
        );
    }
}

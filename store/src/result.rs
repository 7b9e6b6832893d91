//! A device's result as the store keeps it, apart from its record encoding (in `types`), so
//! that the format-1 decoder (`legacy`) can build it without the two modules importing each
//! other: `types` reads old records through `legacy`, and both build these values.

use fleetcast_wire as wire;

/// Maximum stored length of a result's output excerpt (the wire's own limit); longer output
/// keeps its last bytes.
pub const OUTPUT_EXCERPT_MAX: usize = wire::limits::MAX_OUTPUT;

/// A device's result, as the store keeps it: the wire message exactly as the device sent it
/// (every step's status, `TimedOut` included, its exit code and duration, the overall exit
/// code, the output excerpt), and when the gateway received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The result.
    pub result: wire::CommandResult<'static>,
    /// When the gateway received it, ms since the UNIX epoch.
    pub at_ms: u64,
}

impl Received {
    /// True if no step failed or timed out.
    pub fn succeeded(&self) -> bool {
        self.result.steps.iter().all(|s| {
            !matches!(
                s.status,
                wire::StepStatus::Failed | wire::StepStatus::TimedOut
            )
        })
    }
    /// Keeps the last [`OUTPUT_EXCERPT_MAX`] bytes of the output excerpt.
    pub(crate) fn bound(&mut self) {
        let out = &mut self.result.output;
        if out.len() > OUTPUT_EXCERPT_MAX {
            let cut = out.len() - OUTPUT_EXCERPT_MAX;
            out.to_mut().drain(..cut);
        }
    }
}

/// The final result of one command.
// Nearly every stored result is `Received`: boxing it would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredResult {
    /// The device's own result.
    Received(Received),
    /// No result: every attempt timed out, and the queue moved on (`on_failure: continue`).
    TimedOut {
        /// When the gateway gave up, ms since the UNIX epoch.
        at_ms: u64,
    },
    /// No result: an operator skipped the failed command.
    Skipped,
}

/// `StoredResult` record tags.
pub(crate) const RESULT_RECEIVED: u8 = 0;
pub(crate) const RESULT_TIMED_OUT: u8 = 1;
pub(crate) const RESULT_SKIPPED: u8 = 2;

impl StoredResult {
    /// True for a device's result with no failed or timed-out step, and for a skip (the queue
    /// went on as after a success).
    pub fn succeeded(&self) -> bool {
        match self {
            StoredResult::Received(r) => r.succeeded(),
            StoredResult::TimedOut { .. } => false,
            StoredResult::Skipped => true,
        }
    }

    /// Whether the encoded `stored` is the device result `new`, whenever each was received
    /// (for a stored record of an older format, whose bytes differ).
    pub(crate) fn same_decoded(stored: &[u8], new: &StoredResult) -> bool {
        use crate::codec::Record;
        match (StoredResult::decode(stored), new) {
            (Ok(StoredResult::Received(a)), StoredResult::Received(b)) => a.result == b.result,
            _ => false,
        }
    }

    /// Whether two encoded results are the same device result, whenever each was received
    /// (redelivery detection without decoding: the encodings differ only in the trailing
    /// reception time).
    pub(crate) fn same_received(a: &[u8], b: &[u8]) -> bool {
        let tail = 8;
        a.len() == b.len()
            && a.len() > 2 + tail
            && a[1] == RESULT_RECEIVED
            && b[1] == RESULT_RECEIVED
            && a[..a.len() - tail] == b[..b.len() - tail]
    }
}

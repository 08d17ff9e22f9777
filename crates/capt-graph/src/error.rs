//! Errors of the generic tensor-ops layer.

/// Errors raised by an [`crate::Ops`] backend. Every variant names the op (or parameter) so a
/// failure inside a long generic forward pass can be located.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `Ops::param` was asked for a name the backend was not given.
    #[error("parameter `{name}` not found ({available} parameters loaded); check the checkpoint / export tensor names")]
    MissingParam { name: String, available: usize },
    /// An op got arguments it cannot accept (bad rank, dtype, axis, incompatible shapes, ...).
    #[error("{op}: {msg}")]
    Op { op: &'static str, msg: String },
    /// A host tensor whose data length does not match its dims.
    #[error("host tensor: dims {dims:?} need {expected} elements but the data has {got}")]
    HostData {
        dims: Vec<usize>,
        expected: usize,
        got: usize,
    },
    /// candle failed while executing an op.
    #[cfg(feature = "candle")]
    #[error("{op} (candle): {source}")]
    Candle {
        op: &'static str,
        #[source]
        source: candle_core::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Shorthand for [`Error::Op`].
    pub fn op(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Op {
            op,
            msg: msg.into(),
        }
    }
}

/// Attaches the op name to a candle error.
#[cfg(feature = "candle")]
pub(crate) trait CandleCtx<T> {
    fn ctx(self, op: &'static str) -> Result<T>;
}

#[cfg(feature = "candle")]
impl<T> CandleCtx<T> for candle_core::Result<T> {
    fn ctx(self, op: &'static str) -> Result<T> {
        self.map_err(|source| Error::Candle { op, source })
    }
}

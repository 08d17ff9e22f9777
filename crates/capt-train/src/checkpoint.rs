//! The checkpoint layout, owned by `capt-checkpoint` (the exporter reads it without the
//! trainer); re-exported here for the trainer's code.

pub use capt_checkpoint::*;

//! The engines, one per front door. They know the local and remote layers and nothing of
//! the protocols that reach them.

pub mod share;
pub mod volume;

//! firn: an edge storage gateway.
//!
//! The modules follow the layers of DESIGN.md, bottom up; ARCHITECTURE.md walks them.

pub mod cli;
pub mod daemon;
pub mod engines;
pub mod local;
pub mod protocols;
pub mod remote;
pub mod seal;
pub mod size;

//! The protocol doors: thin adapters from a wire protocol to an engine. They know the
//! engines' traits and nothing of the object store.

pub mod nbd;
pub mod nfs;

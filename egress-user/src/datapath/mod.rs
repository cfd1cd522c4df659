pub mod maps;
pub mod reload;
pub mod sys;

pub use maps::{
    Capacity, Datapath, Maps, OrigMaps, monotonic_ns, open, orig_addr, orig_addr_of, unpin,
};

pub mod maps;
pub mod reload;
pub mod sys;

pub use maps::{
    Capacity, Datapath, LearnedMap, Maps, OrigMaps, Pinned, monotonic_ns, open, orig_addr,
    orig_addr_of, pinned_links, unpin,
};

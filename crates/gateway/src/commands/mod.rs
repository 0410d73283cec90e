//! One module per command.

pub mod serve;
pub mod tenant;
pub mod test_providers;
pub mod usage;

//! One module per command.

pub mod tenant;
pub mod test_providers;

//! Process exit statuses shared by every command, node and admin alike (the lowest layer: it imports
//! nothing).

/// A configuration error, so systemd's `RestartPreventExitStatus=` can stop a restart loop.
pub const EXIT_CONFIG: u8 = 78;
/// Any other failure.
pub const EXIT_FAILURE: u8 = 1;
/// A check that could not be made (e.g. `pullgate bundle what-if` could not read the node's state).
pub const EXIT_CANNOT_CHECK: u8 = 2;

//! `postcopy probe`: can this host do postcopy (the seed's `postcopy_ram_supported_by_host`).

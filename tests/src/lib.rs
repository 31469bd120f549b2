//! Test harness: namespaces, daemon, driver.

//! rtnetlink: interface addresses, neighbours and routes straight from the kernel.

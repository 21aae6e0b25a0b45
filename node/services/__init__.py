"""Services that touch the machine: hardware probes, stores, mDNS, the daemon."""

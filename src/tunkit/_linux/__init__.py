"""The Linux TUN device: the only place where tunkit makes system calls."""

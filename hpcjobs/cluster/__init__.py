"""The cluster: the launcher's environment (info), strategies and Horovod (distribute), stop signals."""

"""Weight sharing: per-layer clustering of weights into 2^bits shared values."""

from .cluster import ClusterConfig, cluster, remove_sharing, share_centroids

__all__ = ["ClusterConfig", "cluster", "remove_sharing", "share_centroids"]

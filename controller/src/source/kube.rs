//! The Kubernetes source: kube-rs watchers for every [`Kind`](crate::translate::Kind), feeding
//! the [`Store`](super::Store). (Being written.)

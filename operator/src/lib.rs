//! The ChatOperator: the ChatService custom resource and the reconciler that builds the chat stack.

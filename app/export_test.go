package app

// SetAllowUID replaces the peer uid check of r, which Serve otherwise
// derives from the socket's owner. Call it before Serve.
func SetAllowUID(r *Registry, allow func(uid uint32) bool) { r.allowUID = allow }

// Package yamlerr puts the YAML decoder's errors in an operator's terms,
// for mtcpd's configuration and the policy file: the kind of value a key
// wants rather than the Go type that holds it, and "unknown key" rather
// than "not found in type daemon.Config", and the line and key of a value
// whose own parser refused it (Place).
package yamlerr

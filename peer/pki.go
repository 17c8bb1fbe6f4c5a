package peer

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/netip"
	"slices"
	"time"
)

// clockSkew backdates certificates so that a member whose clock is a
// little behind the issuer's accepts them at once.
const clockSkew = 5 * time.Minute

// CA is a pool's certificate authority: the one issuer every member
// trusts. Keep its key offline; members need only its certificate.
type CA struct {
	// Cert is the CA's self-signed certificate.
	Cert *x509.Certificate

	key     crypto.Signer
	certPEM []byte
	keyPEM  []byte
}

// NewCA makes a pool CA named name (its common name), valid for validity
// from now, with a new ECDSA P-256 key. It can only issue end-entity
// certificates (path length 0).
func NewCA(name string, validity time.Duration) (*CA, error) {
	if name == "" {
		return nil, errors.New("new CA: empty name")
	}
	if validity <= 0 {
		return nil, fmt.Errorf("new CA %s: validity %v is not positive", name, validity)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("new CA %s: key: %w", name, err)
	}
	serial, err := newSerial()
	if err != nil {
		return nil, fmt.Errorf("new CA %s: %w", name, err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: name, Organization: []string{"mtcp pool"}},
		NotBefore:             now.Add(-clockSkew),
		NotAfter:              now.Add(validity),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLen:            0,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("new CA %s: %w", name, err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("new CA %s: key: %w", name, err)
	}
	return LoadCA(pemBlock("CERTIFICATE", der), pemBlock("PRIVATE KEY", keyDER))
}

// LoadCA loads a CA from its PEM certificate and PEM private key (PKCS#8
// "PRIVATE KEY", SEC 1 "EC PRIVATE KEY" or PKCS#1 "RSA PRIVATE KEY", as
// openssl writes them). The certificate must be a CA certificate and the
// key its own.
func LoadCA(certPEM, keyPEM []byte) (*CA, error) {
	cb, _ := pem.Decode(certPEM)
	if cb == nil || cb.Type != "CERTIFICATE" {
		return nil, errors.New("load CA: no PEM CERTIFICATE block in the CA certificate")
	}
	cert, err := x509.ParseCertificate(cb.Bytes)
	if err != nil {
		return nil, fmt.Errorf("load CA: certificate: %w", err)
	}
	if !cert.IsCA || !cert.BasicConstraintsValid {
		return nil, fmt.Errorf("load CA: certificate %q is not a CA certificate (basicConstraints CA:TRUE)", cert.Subject.CommonName)
	}
	if cert.KeyUsage != 0 && cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, fmt.Errorf("load CA: certificate %q may not sign certificates (keyUsage lacks keyCertSign)", cert.Subject.CommonName)
	}
	key, err := parseKey(keyPEM)
	if err != nil {
		return nil, fmt.Errorf("load CA: key: %w", err)
	}
	pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(cert.PublicKey) {
		return nil, fmt.Errorf("load CA: the key does not belong to certificate %q", cert.Subject.CommonName)
	}
	return &CA{Cert: cert, key: key, certPEM: pemBlock("CERTIFICATE", cert.Raw), keyPEM: slices.Clone(keyPEM)}, nil
}

func parseKey(keyPEM []byte) (crypto.Signer, error) {
	for {
		var b *pem.Block
		b, keyPEM = pem.Decode(keyPEM)
		if b == nil {
			return nil, errors.New("no PEM private key block")
		}
		var k any
		var err error
		switch b.Type {
		case "PRIVATE KEY":
			k, err = x509.ParsePKCS8PrivateKey(b.Bytes)
		case "EC PRIVATE KEY":
			k, err = x509.ParseECPrivateKey(b.Bytes)
		case "RSA PRIVATE KEY":
			k, err = x509.ParsePKCS1PrivateKey(b.Bytes)
		default:
			continue // e.g. EC PARAMETERS before the key
		}
		if err != nil {
			return nil, err
		}
		if s, ok := k.(crypto.Signer); ok {
			return s, nil
		}
		return nil, fmt.Errorf("unsupported key type %T", k)
	}
}

// PEM returns the CA's certificate and private key in PEM. The
// certificate goes to every member (ca.pem); the key should stay offline.
func (ca *CA) PEM() (certPEM, keyPEM []byte) {
	return slices.Clone(ca.certPEM), slices.Clone(ca.keyPEM)
}

// Issue makes a certificate for the pool member name, with a new ECDSA
// P-256 key, valid for validity from now but never past the CA's own
// expiry. It is both a server and a client certificate (the control
// channel uses mutual TLS); its common name is name and its subject
// alternative names are name and dns as DNS names, and ips, so that
// peers can dial it by name or address.
func (ca *CA) Issue(name string, ips []netip.Addr, dns []string, validity time.Duration) (certPEM, keyPEM []byte, err error) {
	if validity <= 0 {
		return nil, nil, fmt.Errorf("issue %s: validity %v is not positive", name, validity)
	}
	now := time.Now()
	return ca.issue(name, ips, dns, now.Add(-clockSkew), now.Add(validity))
}

func (ca *CA) issue(name string, ips []netip.Addr, dns []string, notBefore, notAfter time.Time) (certPEM, keyPEM []byte, err error) {
	if err := CheckName(name); err != nil {
		return nil, nil, fmt.Errorf("issue: %w: member name %w", ErrInvalidName, err)
	}
	names := []string{name}
	for _, d := range dns {
		if err := CheckName(d); err != nil {
			return nil, nil, fmt.Errorf("issue %s: %w: DNS name %w", name, ErrInvalidName, err)
		}
		if !slices.Contains(names, d) {
			names = append(names, d)
		}
	}
	var addrs []net.IP
	for _, a := range ips {
		if !a.IsValid() {
			return nil, nil, fmt.Errorf("issue %s: %w: IP address %v", name, ErrInvalidName, a)
		}
		addrs = append(addrs, net.IP(a.Unmap().AsSlice()))
	}
	if notAfter.After(ca.Cert.NotAfter) {
		notAfter = ca.Cert.NotAfter
	}
	if !notAfter.After(notBefore) {
		return nil, nil, fmt.Errorf("issue %s: the pool CA %q expires on %v: make a new pool CA", name, ca.Cert.Subject.CommonName, ca.Cert.NotAfter.Format(time.RFC3339))
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("issue %s: key: %w", name, err)
	}
	serial, err := newSerial()
	if err != nil {
		return nil, nil, fmt.Errorf("issue %s: %w", name, err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		DNSNames:              names,
		IPAddresses:           addrs,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.key)
	if err != nil {
		return nil, nil, fmt.Errorf("issue %s: %w", name, err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, fmt.Errorf("issue %s: key: %w", name, err)
	}
	return pemBlock("CERTIFICATE", der), pemBlock("PRIVATE KEY", keyDER), nil
}

// CheckName accepts names usable both as a certificate's DNS name and as
// a TLS server name: letters, digits, '-', '_' and '.'-separated labels.
// A pool member's name is one (mtcpd's configuration and mtcpctl certs
// check theirs with it).
func CheckName(s string) error {
	if s == "" {
		return errors.New("is empty")
	}
	if len(s) > 253 {
		return fmt.Errorf("%.20q... is longer than 253 characters", s)
	}
	if _, err := netip.ParseAddr(s); err == nil {
		return fmt.Errorf("%q is an IP address: give it with --ip / ips", s)
	}
	label := 0
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '.':
			if label == 0 {
				return fmt.Errorf("%q has an empty label", s)
			}
			label = 0
			continue
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9', c == '-', c == '_':
		default:
			return fmt.Errorf("%q: character %q not allowed (use letters, digits, '-', '_' and '.')", s, c)
		}
		if label++; label > 63 {
			return fmt.Errorf("%q has a label longer than 63 characters", s)
		}
	}
	if label == 0 {
		return fmt.Errorf("%q ends with '.'", s)
	}
	return nil
}

func newSerial() (*big.Int, error) {
	s, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("serial number: %w", err)
	}
	return s.Add(s, big.NewInt(1)), nil
}

func pemBlock(typ string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}

package peer

import (
	"context"
	"crypto/x509"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// writeMember writes ca.pem, NAME.pem and NAME-key.pem into dir.
func writeMember(t *testing.T, dir string, ca *CA, certPEM, keyPEM []byte, name string) TLSFiles {
	t.Helper()
	caPEM, _ := ca.PEM()
	f := TLSFiles{CA: filepath.Join(dir, "ca.pem"), Cert: filepath.Join(dir, name+".pem"), Key: filepath.Join(dir, name+"-key.pem")}
	for path, data := range map[string][]byte{f.CA: caPEM, f.Cert: certPEM, f.Key: keyPEM} {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return f
}

func TestTLSFilesConfig(t *testing.T) {
	ca := testCA(t, "pool")
	other := testCA(t, "other")
	dir := t.TempDir()
	certPEM, keyPEM, err := ca.Issue("s1", []netip.Addr{netip.MustParseAddr("10.77.3.11")}, []string{"s1.pool.example"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	good := writeMember(t, dir, ca, certPEM, keyPEM, "s1")

	cfg, err := good.Config("s1")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Name != "s1" || cfg.Roots == nil || len(cfg.Certificate.Certificate) != 1 {
		t.Errorf("Config = %+v", cfg)
	}
	leaf := cfg.Certificate.Leaf
	if leaf.Subject.CommonName != "s1" || strings.Join(leaf.DNSNames, ",") != "s1,s1.pool.example" ||
		len(leaf.IPAddresses) != 1 || !leaf.IPAddresses[0].Equal(net.ParseIP("10.77.3.11")) {
		t.Errorf("certificate names CN %q, DNS %q, IP %v", leaf.Subject.CommonName, leaf.DNSNames, leaf.IPAddresses)
	}
	if d := time.Until(leaf.NotAfter); d > time.Hour || d < 59*time.Minute {
		t.Errorf("certificate expires in %v, want 1h", d)
	}
	if cfg, err := good.Config(""); err != nil || cfg.Name != "s1" {
		t.Errorf("Config(\"\") = %+v, %v: want the certificate's name", cfg, err)
	}

	otherCert, otherKey, _ := other.Issue("s1", nil, nil, time.Hour)
	expCert, expKey, _ := ca.issue("s1", nil, nil, time.Now().Add(-2*time.Hour), time.Now().Add(-time.Hour))
	for _, tc := range []struct {
		name  string
		files func(t *testing.T) TLSFiles
		as    string
		want  []string
	}{
		{"wrong name", func(*testing.T) TLSFiles { return good }, "s2", []string{`is issued to "s1", not to this server "s2"`, "certs issue --name s2"}},
		{"key readable by others", func(t *testing.T) TLSFiles {
			f := writeMember(t, t.TempDir(), ca, certPEM, keyPEM, "s1")
			os.Chmod(f.Key, 0o644)
			return f
		}, "s1", []string{"readable by group or others (mode 0644)", "chmod 600"}},
		{"certificate of another CA", func(t *testing.T) TLSFiles {
			return writeMember(t, t.TempDir(), ca, otherCert, otherKey, "s1")
		}, "s1", []string{"not valid for the pool", "unknown authority", "mtcpctl certs issue"}},
		{"expired certificate", func(t *testing.T) TLSFiles {
			return writeMember(t, t.TempDir(), ca, expCert, expKey, "s1")
		}, "s1", []string{"not valid for the pool", "expired"}},
		{"key of another certificate", func(t *testing.T) TLSFiles {
			return writeMember(t, t.TempDir(), ca, certPEM, otherKey, "s1")
		}, "s1", []string{"private key does not match public key"}},
		{"missing CA", func(t *testing.T) TLSFiles {
			f := good
			f.CA = filepath.Join(t.TempDir(), "nope.pem")
			return f
		}, "s1", []string{"pool CA certificate", "no such file"}},
		{"CA file without certificate", func(t *testing.T) TLSFiles {
			f := writeMember(t, t.TempDir(), ca, certPEM, keyPEM, "s1")
			os.WriteFile(f.CA, []byte("hello"), 0o600)
			return f
		}, "s1", []string{"holds no PEM certificate"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := tc.files(t).Config(tc.as)
			if err == nil {
				t.Fatal("accepted")
			}
			t.Log(err)
			mustContain(t, "error", err.Error(), tc.want...)
		})
	}
}

func TestCAPEMRoundTrip(t *testing.T) {
	ca := testCA(t, "pool")
	certPEM, keyPEM := ca.PEM()
	again, err := LoadCA(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	if !again.Cert.Equal(ca.Cert) {
		t.Error("loaded CA certificate differs")
	}
	if !ca.Cert.IsCA || !ca.Cert.MaxPathLenZero || ca.Cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		t.Errorf("CA certificate: IsCA %v, MaxPathLenZero %v, KeyUsage %v", ca.Cert.IsCA, ca.Cert.MaxPathLenZero, ca.Cert.KeyUsage)
	}
	// A member issued by the loaded CA talks to one issued by the original.
	s := startServer(t, memberConfig(t, ca, "s1"), &testHandler{})
	c, err := Dial(context.Background(), s.addr, "s1", memberConfig(t, again, "c1"))
	if err != nil {
		t.Fatal(err)
	}
	c.Close()

	other := testCA(t, "other")
	_, otherKey := other.PEM()
	if _, err := LoadCA(certPEM, otherKey); err == nil || !strings.Contains(err.Error(), "does not belong") {
		t.Errorf("LoadCA with another CA's key: %v", err)
	}
	memberCert, memberKey, _ := ca.Issue("s1", nil, nil, time.Hour)
	if _, err := LoadCA(memberCert, memberKey); err == nil || !strings.Contains(err.Error(), "not a CA certificate") {
		t.Errorf("LoadCA with a member certificate: %v", err)
	}
	if _, err := LoadCA(nil, keyPEM); err == nil {
		t.Error("LoadCA without certificate succeeded")
	}
}

func TestIssueChecks(t *testing.T) {
	ca := testCA(t, "pool")
	for _, name := range []string{"", "s 1", "s1.", ".s1", "a..b", "10.0.0.1", "ünï", strings.Repeat("a", 64)} {
		if _, _, err := ca.Issue(name, nil, nil, time.Hour); err == nil {
			t.Errorf("Issue(%q) succeeded", name)
		}
	}
	if _, _, err := ca.Issue("s1", nil, []string{"bad name"}, time.Hour); err == nil {
		t.Error("Issue with a bad DNS name succeeded")
	}
	if _, _, err := ca.Issue("s1", []netip.Addr{{}}, nil, time.Hour); err == nil {
		t.Error("Issue with an invalid IP succeeded")
	}
	if _, _, err := ca.Issue("s1", nil, nil, 0); err == nil {
		t.Error("Issue with no validity succeeded")
	}
	// Never valid beyond the CA.
	certPEM, keyPEM, err := ca.Issue("s1", []netip.Addr{netip.MustParseAddr("::ffff:10.0.0.1"), netip.MustParseAddr("fd77:3::11")}, nil, 1000*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	leaf := configFromPEM(t, ca, "s1", certPEM, keyPEM).Certificate.Leaf
	if !leaf.NotAfter.Equal(ca.Cert.NotAfter) {
		t.Errorf("certificate expires %v, after its CA (%v)", leaf.NotAfter, ca.Cert.NotAfter)
	}
	if len(leaf.IPAddresses) != 2 || leaf.IPAddresses[0].String() != "10.0.0.1" || leaf.IPAddresses[1].String() != "fd77:3::11" {
		t.Errorf("IP SANs %v", leaf.IPAddresses)
	}
}

// TestOpenSSLSteps runs the openssl commands of the package
// documentation and checks that their files work with this package.
func TestOpenSSLSteps(t *testing.T) {
	if _, err := exec.LookPath("openssl"); err != nil {
		t.Skip("openssl not installed")
	}
	doc, err := os.ReadFile("doc.go")
	if err != nil {
		t.Fatal(err)
	}
	var script strings.Builder
	script.WriteString("set -e\n")
	in := false
	for _, line := range strings.Split(string(doc), "\n") {
		switch {
		case strings.HasPrefix(line, "//\t# The pool CA"):
			in = true
		case in && !strings.HasPrefix(line, "//\t") && line != "//":
			in = false
		}
		if in {
			script.WriteString(strings.TrimPrefix(strings.TrimPrefix(line, "//"), "\t") + "\n")
		}
	}
	if !strings.Contains(script.String(), "openssl x509 -req") {
		t.Fatalf("no openssl steps found in doc.go:\n%s", script.String())
	}
	dir := t.TempDir()
	cmd := exec.Command("bash", "-c", script.String())
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("openssl steps: %v\n%s\nscript:\n%s", err, out, script.String())
	}
	files := TLSFiles{CA: filepath.Join(dir, "ca.pem"), Cert: filepath.Join(dir, "s1.pem"), Key: filepath.Join(dir, "s1-key.pem")}
	scfg, err := files.Config("s1")
	if err != nil {
		t.Fatal(err)
	}
	caPEM, _ := os.ReadFile(files.CA)
	caKeyPEM, _ := os.ReadFile(filepath.Join(dir, "ca-key.pem"))
	ca, err := LoadCA(caPEM, caKeyPEM)
	if err != nil {
		t.Fatal(err)
	}
	s := startServer(t, scfg, &testHandler{})
	c, err := Dial(context.Background(), s.addr, "s1", memberConfig(t, ca, "c1"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Status(context.Background()); err != nil {
		t.Fatal(err)
	}
	// The member also dials by the IP address in its certificate.
	if _, err := Dial(context.Background(), s.addr, "10.77.3.11", memberConfig(t, ca, "c1")); err != nil {
		t.Errorf("dialling s1 by the IP of its certificate: %v", err)
	}
}

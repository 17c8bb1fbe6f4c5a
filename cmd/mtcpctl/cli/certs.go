package cli

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/mtcp-dev/mtcp/peer"
)

const (
	caCertFile = "ca.pem"
	caKeyFile  = "ca-key.pem"
	day        = 24 * time.Hour
)

func newCertsCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "certs",
		Short: "Make the pool CA and the certificates of pool members",
		Long: `Make the certificates that let mtcpd daemons talk to each other.

mtcpd daemons move live TCP connections among themselves: a connection's
state, sent by one daemon, installs that connection on another. So every
daemon talks to its peers only over mutual TLS 1.3, and only with members of
its pool, where a member is whoever holds a certificate issued by the pool's
own certificate authority (the pool CA):

  - every daemon trusts the pool CA (ca.pem) and nothing else, not the
    system's CAs;
  - every daemon has its own certificate and key, issued for its name (and
    the addresses peers dial it at) by the pool CA;
  - a peer without such a certificate, with one from another CA or an
    expired one, is refused during the TLS handshake, before it can send
    anything; a daemon also refuses a server whose certificate does not
    name the peer it meant to reach.

The pool CA's key (ca-key.pem) signs new members: whoever has it can join
the pool and take over connections. Keep it offline, on the machine where
you run 'certs issue', and copy to each server only ca.pem and that server's
own certificate and key. There is no revocation: to remove a member for
good, make a new CA and reissue the others' certificates.

Files are PEM, keys ECDSA P-256 (PKCS#8), readable by their owner only.
'go doc github.com/mtcp-dev/mtcp/peer' shows the same steps with openssl.`,
		Example: `  # Once, on an offline machine:
  mtcpctl certs init --dir ./pool-ca --name prod-pool
  # For each server, with the names and addresses its peers dial:
  mtcpctl certs issue --dir ./pool-ca --name s1 --ip 10.77.3.11
  # Then copy ./pool-ca/ca.pem, s1.pem and s1-key.pem to s1, and in its
  # mtcpd.yaml:  tls: {ca: /etc/mtcp/pki/ca.pem, cert: /etc/mtcp/pki/s1.pem, key: /etc/mtcp/pki/s1-key.pem}`,
		Args: subcommandArgs,
		RunE: missingSubcommand,
	}
	cmd.AddCommand(newCertsInitCmd(), newCertsIssueCmd())
	return cmd
}

// certInfo describes a certificate written by 'certs init' or 'certs
// issue' (-o json).
type certInfo struct {
	Name        string    `json:"name"`
	Cert        string    `json:"cert"`
	Key         string    `json:"key"`
	CA          string    `json:"ca,omitempty"` // issue: the CA that signed it
	DNS         []string  `json:"dns,omitempty"`
	IPs         []string  `json:"ips,omitempty"`
	NotAfter    time.Time `json:"not_after"`
	Fingerprint string    `json:"sha256_fingerprint"`
}

func describeCert(certPEM []byte, certPath, keyPath string) (*certInfo, error) {
	b, _ := pem.Decode(certPEM)
	if b == nil {
		return nil, errors.New("no PEM certificate")
	}
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256(c.Raw)
	hex := make([]string, len(sum))
	for i, x := range sum {
		hex[i] = fmt.Sprintf("%02X", x)
	}
	info := &certInfo{Name: c.Subject.CommonName, Cert: certPath, Key: keyPath, DNS: c.DNSNames,
		NotAfter: c.NotAfter.UTC(), Fingerprint: strings.Join(hex, ":")}
	for _, ip := range c.IPAddresses {
		info.IPs = append(info.IPs, ip.String())
	}
	return info, nil
}

func addDaysFlag(cmd *cobra.Command, days *int, def int) {
	cmd.Flags().IntVar(days, "days", def, "validity in days from now")
}

func checkDays(days int) error {
	if days <= 0 || days > 100*365 {
		return usageErrorf("--days %d: give a number of days between 1 and 36500", days)
	}
	return nil
}

func newCertsInitCmd() *cobra.Command {
	var dir, name string
	var days int
	var force bool
	var output outputFormat
	cmd := &cobra.Command{
		Use:   "init --dir DIR [--name POOL] [--days N]",
		Short: "Create a pool CA: DIR/ca.pem and DIR/ca-key.pem",
		Long: `Create a new pool CA in DIR (created with mode 0700 if missing): its
certificate ca.pem, which every member of the pool gets, and its private key
ca-key.pem (mode 0600), which signs members' certificates and should stay
offline. --name names the pool in the CA certificate.

An existing CA is never replaced unless --force is given: a new CA makes
every certificate issued by the old one useless.`,
		Example: `  mtcpctl certs init --dir ./pool-ca --name prod-pool
  mtcpctl certs init --dir ./pool-ca --days 1825 -o json`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if dir == "" {
				return usageErrorf("--dir DIR is required: the directory for ca.pem and ca-key.pem")
			}
			if err := checkDays(days); err != nil {
				return err
			}
			if name == "" {
				return usageErrorf("--name must not be empty")
			}
			certPath, keyPath := filepath.Join(dir, caCertFile), filepath.Join(dir, caKeyFile)
			if !force {
				if err := refuseExisting("pool CA", certPath, keyPath); err != nil {
					return err
				}
			}
			ca, err := peer.NewCA(name, time.Duration(days)*day)
			if err != nil {
				return err
			}
			certPEM, keyPEM := ca.PEM()
			if err := os.MkdirAll(dir, 0o700); err != nil {
				return err
			}
			info, err := writeKeyPair(certPath, keyPath, certPEM, keyPEM)
			if err != nil {
				return err
			}
			if output == outputJSON {
				return writeJSON(cmd.OutOrStdout(), info)
			}
			w := cmd.OutOrStdout()
			fmt.Fprintf(w, "Created the pool CA %q, valid until %s.\n", name, info.NotAfter.Format(time.DateOnly))
			tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			fmt.Fprintf(tw, "  %s\tcertificate: give it to every member (tls: ca: in mtcpd.yaml)\n", certPath)
			fmt.Fprintf(tw, "  %s\tprivate key (mode 0600): keep it offline; it admits members to the pool\n", keyPath)
			tw.Flush()
			fmt.Fprintf(w, "SHA-256 fingerprint: %s\n", info.Fingerprint)
			fmt.Fprintf(w, "Next, for each server: mtcpctl certs issue --dir %s --name NAME --ip ADDRESS\n", dir)
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "directory for ca.pem and ca-key.pem (required)")
	cmd.Flags().StringVar(&name, "name", "pool", "name of the pool, the CA certificate's common name")
	cmd.Flags().BoolVar(&force, "force", false, "replace an existing CA (its certificates stop working)")
	addDaysFlag(cmd, &days, 3650)
	addOutputFlag(cmd, &output)
	return cmd
}

func newCertsIssueCmd() *cobra.Command {
	var dir, name string
	var ips, dns []string
	var days int
	var force bool
	var output outputFormat
	cmd := &cobra.Command{
		Use:   "issue --dir DIR --name NAME [--ip ADDR...] [--dns NAME...] [--days N]",
		Short: "Issue a member's certificate: DIR/NAME.pem and DIR/NAME-key.pem",
		Long: `Issue a certificate for the pool member NAME, signed by the pool CA in DIR
(ca.pem and ca-key.pem, made by 'mtcpctl certs init'), with a new private
key. It writes DIR/NAME.pem and DIR/NAME-key.pem (the key readable by its owner
only, mode 0600).

NAME is the member's name in the pool: the name in its mtcpd.yaml and in its
peers' lists. It goes in the certificate as common name and DNS name; a
daemon dialling NAME accepts only a certificate that names it. Add the
addresses peers dial it at with --ip, and other DNS names with --dns (each
repeatable or comma-separated). The certificate serves as both server and
client certificate, and never outlives the CA.

Existing files are not replaced unless --force is given. To keep members'
keys off the CA's machine, sign certificate requests with openssl instead
(see 'go doc github.com/mtcp-dev/mtcp/peer').`,
		Example: `  mtcpctl certs issue --dir ./pool-ca --name s1 --ip 10.77.3.11
  mtcpctl certs issue --dir ./pool-ca --name s2 --ip 10.77.3.12,fd77:3::12 --dns s2.pool.example
  mtcpctl certs issue --dir ./pool-ca --name s3 --days 90 --force -o json`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if dir == "" {
				return usageErrorf("--dir DIR is required: the directory of the pool CA (ca.pem, ca-key.pem)")
			}
			if name == "" {
				return usageErrorf("--name NAME is required: the member's name in the pool")
			}
			if strings.ContainsAny(name, `/\`) {
				return usageErrorf("--name %q: a member name cannot contain '/'", name)
			}
			if name == "ca" || name == "ca-key" {
				// Its files would be the CA's own: ca.pem, ca-key.pem.
				return usageErrorf("--name %q: the pool CA's files are %s.pem; choose another member name", name, name)
			}
			if err := checkDays(days); err != nil {
				return err
			}
			var addrs []netip.Addr
			for _, s := range ips {
				a, err := netip.ParseAddr(strings.TrimSpace(s))
				if err != nil || a.Zone() != "" {
					return usageErrorf("--ip %q is not an IP address", s)
				}
				addrs = append(addrs, a)
			}
			ca, err := loadCADir(dir)
			if err != nil {
				return err
			}
			certPath, keyPath := filepath.Join(dir, name+".pem"), filepath.Join(dir, name+"-key.pem")
			if !force {
				if err := refuseExisting("certificate of "+name, certPath, keyPath); err != nil {
					return err
				}
			}
			certPEM, keyPEM, err := ca.Issue(name, addrs, dns, time.Duration(days)*day)
			if errors.Is(err, peer.ErrInvalidName) {
				return &usageError{err: err}
			}
			if err != nil {
				return err
			}
			info, err := writeKeyPair(certPath, keyPath, certPEM, keyPEM)
			if err != nil {
				return err
			}
			info.CA = ca.Cert.Subject.CommonName
			if output == outputJSON {
				return writeJSON(cmd.OutOrStdout(), info)
			}
			printIssued(cmd.OutOrStdout(), info, dir, name, ca.Cert.NotAfter)
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "directory of the pool CA, where the new files go too (required)")
	cmd.Flags().StringVar(&name, "name", "", "the member's name in the pool (required)")
	cmd.Flags().StringSliceVar(&ips, "ip", nil, "IP address peers dial the member at (repeatable)")
	cmd.Flags().StringSliceVar(&dns, "dns", nil, "another DNS name of the member (repeatable)")
	cmd.Flags().BoolVar(&force, "force", false, "replace existing files of this member")
	addDaysFlag(cmd, &days, 365)
	addOutputFlag(cmd, &output)
	return cmd
}

func printIssued(w io.Writer, info *certInfo, dir, name string, caNotAfter time.Time) {
	names := "DNS " + strings.Join(info.DNS, ", ")
	if len(info.IPs) > 0 {
		names += "; IP " + strings.Join(info.IPs, ", ")
	}
	fmt.Fprintf(w, "Issued %q (%s), valid until %s, signed by the pool CA %q.\n", name, names, info.NotAfter.Format(time.DateOnly), info.CA)
	if !info.NotAfter.Before(caNotAfter.UTC()) {
		fmt.Fprintln(w, "  (shortened to the CA's own expiry)")
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "  %s\tcertificate\n", info.Cert)
	fmt.Fprintf(tw, "  %s\tprivate key (mode 0600)\n", info.Key)
	tw.Flush()
	fmt.Fprintf(w, "Copy %s, %s and %s to %s, readable by root only; its mtcpd.yaml names them:\n",
		filepath.Join(dir, caCertFile), info.Cert, info.Key, name)
	fmt.Fprintf(w, "  tls: {ca: /etc/mtcp/pki/%s, cert: /etc/mtcp/pki/%s.pem, key: /etc/mtcp/pki/%s-key.pem}\n", caCertFile, name, name)
}

// loadCADir loads the pool CA of dir.
func loadCADir(dir string) (*peer.CA, error) {
	certPath, keyPath := filepath.Join(dir, caCertFile), filepath.Join(dir, caKeyFile)
	certPEM, err := os.ReadFile(certPath)
	if err == nil {
		var keyPEM []byte
		if keyPEM, err = os.ReadFile(keyPath); err == nil {
			return peer.LoadCA(certPEM, keyPEM)
		}
	}
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("no pool CA in %s (%v): create one with 'mtcpctl certs init --dir %s', or point --dir at the directory that holds ca.pem and ca-key.pem", dir, err, dir)
	}
	return nil, err
}

// refuseExisting fails if any of paths exists.
func refuseExisting(what string, paths ...string) error {
	for _, p := range paths {
		if _, err := os.Lstat(p); err == nil {
			return fmt.Errorf("%s exists: not replacing the %s (--force replaces it)", p, what)
		} else if !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	return nil
}

// writeKeyPair writes a key and its certificate and describes the
// certificate. Key first: a certificate without its key is useless, the
// opposite is merely incomplete.
func writeKeyPair(certPath, keyPath string, certPEM, keyPEM []byte) (*certInfo, error) {
	if err := writeFileAtomic(keyPath, keyPEM, 0o600); err != nil {
		return nil, err
	}
	if err := writeFileAtomic(certPath, certPEM, 0o644); err != nil {
		return nil, err
	}
	return describeCert(certPEM, certPath, keyPath)
}

// writeFileAtomic writes data to path with mode perm, whether path
// existed or not: a replaced key never keeps a looser mode, and a
// reader never sees half a file.
func writeFileAtomic(path string, data []byte, perm os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	err = f.Chmod(perm)
	if err == nil {
		_, err = f.Write(data)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

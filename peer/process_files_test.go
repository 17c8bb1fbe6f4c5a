package peer

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// pagesOnly accepts the memory page images of a checkpoint.
func pagesOnly(name string, size uint64) error {
	if !strings.HasPrefix(name, "pages-") {
		return errors.New("not a page image")
	}
	return nil
}

func TestSendReceiveFiles(t *testing.T) {
	src, dst := t.TempDir(), t.TempDir()
	big := bytes.Repeat([]byte("page"), 3<<20/4+7)
	files := map[string][]byte{"pages-1.img": big, "pages-2.img": {}, "pages-3.img": []byte("x")}
	var names []string
	for n, b := range files {
		if err := os.WriteFile(filepath.Join(src, n), b, 0o600); err != nil {
			t.Fatal(err)
		}
		names = append(names, n)
	}
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	type result struct {
		names []string
		err   error
	}
	got := make(chan result, 1)
	go func() {
		n, err := ReceiveFiles(b, b, dst, pagesOnly)
		got <- result{n, err}
	}()
	sent, err := SendFiles(a, a, src, names)
	if err != nil {
		t.Fatalf("SendFiles: %v", err)
	}
	if want := int64(len(big) + 1); sent != want {
		t.Errorf("sent %d bytes, want %d", sent, want)
	}
	res := <-got
	if res.err != nil || len(res.names) != len(files) {
		t.Fatalf("ReceiveFiles: %v, %v", res.names, res.err)
	}
	for n, want := range files {
		b, err := os.ReadFile(filepath.Join(dst, n))
		if err != nil || !bytes.Equal(b, want) {
			t.Errorf("%s: %d bytes (%v), want %d", n, len(b), err, len(want))
		}
	}
}

func TestReceiveFilesRefuses(t *testing.T) {
	for _, tc := range []struct {
		name, file string
		exists     bool
		room       uint64 // what the receiver takes (0: any size)
	}{
		{"a name the receiver rejects", "core-1.img", false, 0},
		{"a file that exists", "pages-1.img", true, 0},
		{"a file larger than the receiver takes", "pages-1.img", false, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src, dst := t.TempDir(), t.TempDir()
			os.WriteFile(filepath.Join(src, tc.file), []byte("new"), 0o600)
			if tc.exists {
				os.WriteFile(filepath.Join(dst, tc.file), []byte("old"), 0o600)
			}
			a, b := net.Pipe()
			errc := make(chan error, 1)
			go func() {
				_, err := ReceiveFiles(b, b, dst, func(name string, size uint64) error {
					if tc.room > 0 && size > tc.room {
						return errors.New("no room")
					}
					return pagesOnly(name, size)
				})
				b.Close() // as the server does when the handler returns
				errc <- err
			}()
			if _, err := SendFiles(a, a, src, []string{tc.file}); err == nil {
				t.Error("SendFiles succeeded")
			}
			a.Close()
			if err := <-errc; err == nil {
				t.Error("ReceiveFiles accepted the file")
			}
			if tc.exists {
				if b, _ := os.ReadFile(filepath.Join(dst, tc.file)); string(b) != "old" {
					t.Errorf("the existing file was changed: %q", b)
				}
			} else if _, err := os.Stat(filepath.Join(dst, tc.file)); err == nil {
				t.Error("the refused file was written")
			}
		})
	}
}

// TestReceiveFilesNames: ReceiveFiles itself refuses a name that is not a
// plain file name (a path out of dir, a path into a subdirectory), even
// when its caller's accept would take it, and writes nothing.
func TestReceiveFilesNames(t *testing.T) {
	for _, name := range []string{"../escaped", "sub/file", "/etc/x", "..", "", "a\x00b"} {
		base := t.TempDir()
		dst := filepath.Join(base, "dst")
		os.MkdirAll(filepath.Join(dst, "sub"), 0o700)
		var in bytes.Buffer
		in.Write(binary.BigEndian.AppendUint16(nil, uint16(len(name))))
		in.WriteString(name)
		in.Write(binary.BigEndian.AppendUint64(nil, 3))
		in.WriteString("abc")
		in.Write([]byte{0, 0})
		var out bytes.Buffer
		names, err := ReceiveFiles(&in, &out, dst, func(string, uint64) error { return nil })
		if name == "" {
			// A zero length ends the list: nothing is received.
			if err != nil || len(names) != 0 {
				t.Errorf("empty name: %v, %v", names, err)
			}
			continue
		}
		if err == nil {
			t.Errorf("%q: accepted (%v)", name, names)
		}
		for _, p := range []string{filepath.Join(base, "escaped"), filepath.Join(dst, "sub", "file")} {
			if _, serr := os.Stat(p); serr == nil {
				t.Errorf("%q: wrote %s", name, p)
			}
		}
	}
}

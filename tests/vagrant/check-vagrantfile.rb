#!/usr/bin/env ruby
# Static check of the Vagrantfile with plain Ruby, for CI machines without
# Vagrant: it loads the Vagrantfile against a stand-in of Vagrant's
# configuration API (Vagrant.configure("2"), config.vm.*) and checks that
#   - it parses and runs;
#   - it defines the VMs s1, s2, s3, gateway, client, in that order;
#   - every VM is provisioned by the netns tests' own script, as
#     `cd /vagrant && bash tests/setup.sh --node NAME ...`, from the source
#     tree synced to /vagrant;
#   - for both providers (libvirt, VirtualBox), every VM gets exactly its
#     PLAN rows as private networks (address, MAC, no auto-configuration,
#     the shared network mtcp-NET).
# (tests/vagrant/nodeconf's Go test checks PLAN against tests/testbed's
# plan.) Where Vagrant is installed, `vagrant validate` checks more.
#
#   ruby tests/vagrant/check-vagrantfile.rb [Vagrantfile]
require "tmpdir"
require "fileutils"

# Accepts any provider setting (lv.memory = 2048, ...).
class AnySettings
  def method_missing(*_args)
    self
  end

  def respond_to_missing?(*_args)
    true
  end
end

class VMConfig
  attr_reader :machines, :provisioners, :networks, :providers, :synced
  attr_accessor :box, :hostname

  def initialize
    @machines = []
    @provisioners = []
    @networks = []
    @providers = []
    @synced = []
  end

  def synced_folder(src, dst, **opts)
    @synced << [src, dst, opts]
  end

  def network(type, **opts)
    @networks << [type, opts]
  end

  def provision(type, **opts)
    @provisioners << [type, opts]
  end

  def provider(name, &block)
    @providers << [name, block]
  end

  def define(name, &block)
    cfg = StandInConfig.new
    block.call(cfg)
    @machines << [name, cfg]
  end
end

class StandInConfig
  attr_reader :vm

  def initialize
    @vm = VMConfig.new
  end
end

module Vagrant
  class << self
    attr_reader :root

    def configure(version)
      raise "Vagrant.configure(#{version.inspect}): want \"2\"" unless version == "2"
      @root = StandInConfig.new
      yield @root
    end
  end
end

errors = []
check = ->(ok, msg) { errors << msg unless ok }

vagrantfile = File.expand_path(ARGV[0] || File.join(__dir__, "..", "..", "Vagrantfile"))
Dir.mktmpdir do |dot|
  # The Vagrantfile makes the harness's ssh key when it is missing; give
  # it one, so that no ssh-keygen is needed here.
  ENV["VAGRANT_DOTFILE_PATH"] = dot
  FileUtils.mkdir_p(File.join(dot, "mtcp-ssh"))
  %w[id_ed25519 id_ed25519.pub].each { |f| File.write(File.join(dot, "mtcp-ssh", f), "stand-in\n") }
  load vagrantfile
end

root = Vagrant.root
check.(!root.nil?, "the Vagrantfile does not call Vagrant.configure")
exit_with = lambda do
  if errors.empty?
    puts "check-vagrantfile: #{vagrantfile}: ok (#{root.vm.machines.map(&:first).join(", ")}; " \
         "each provisioned by tests/setup.sh --node NAME; networks as PLAN for libvirt and VirtualBox)"
    exit 0
  end
  errors.each { |e| warn "check-vagrantfile: #{e}" }
  exit 1
end
exit_with.call if root.nil?

names = root.vm.machines.map(&:first)
check.(names == %w[s1 s2 s3 gateway client], "VMs #{names.inspect}, want s1 s2 s3 gateway client (servers first, the client last)")
check.(root.vm.synced.any? { |src, dst, _| src == "." && dst == "/vagrant" }, "the source tree is not synced to /vagrant")
check.(defined?(PLAN) && PLAN.is_a?(Array) && !PLAN.empty?, "no PLAN table")

root.vm.machines.each do |name, cfg|
  shells = cfg.vm.provisioners.select { |type, _| type.to_s == "shell" }
  want = "cd /vagrant && bash tests/setup.sh --node #{name} "
  check.(shells.size == 1 && shells[0][1][:inline].to_s.start_with?(want),
         "#{name}: want one shell provisioner running #{want.strip} ...; got #{shells.map { |_, o| o[:inline] }.inspect}")
  rows = PLAN.select { |row| row[0] == name }
  check.(!rows.empty?, "#{name}: no PLAN rows")
  { libvirt: ->(mac) { mac }, virtualbox: ->(mac) { mac.delete(":") } }.each do |provider, macfmt|
    override = StandInConfig.new
    (root.vm.providers + cfg.vm.providers).each do |pname, block|
      block.call(AnySettings.new, override) if pname == provider
    end
    nets = (cfg.vm.networks + override.vm.networks).select { |type, _| type.to_s == "private_network" }
    got = nets.map { |_, o| [o[:ip], o[:mac], o[:auto_config], o[:libvirt__network_name] || o[:virtualbox__intnet]] }.sort
    wanted = rows.map { |_, net, ip, mac| [ip, macfmt.(mac), false, "mtcp-#{net}"] }.sort
    check.(got == wanted, "#{name} (#{provider}): private networks #{got.inspect}, want #{wanted.inspect}")
  end
end
exit_with.call

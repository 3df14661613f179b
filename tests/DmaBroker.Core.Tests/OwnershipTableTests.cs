using DmaBroker.Core.Ownership;
using DmaBroker.Core.Sessions;
using DmaBroker.Core.Topology;
using DmaBroker.Core.Vfio;

namespace DmaBroker.Core.Tests;

/// <summary>
/// SPEC §3, the ownership table of Linux <c>drivers/iommu/iommu.c</c>, as a table. Each row puts
/// the GPU group of the default topology (group 11: 03:00.0 on vfio-pci, 03:00.1 driver-less) into
/// a state, runs one operation, and checks the errno and the whole resulting state.
/// </summary>
/// <remarks>
/// State notation: <c>OWNER DOMAIN gGEN [dev=DRIVER]</c>. OWNER is <c>NONE</c>, <c>KERNEL(n)</c> or
/// <c>USER(session,n)</c> with sessions A and B; DOMAIN is <c>DEFAULT</c>, <c>BLOCKING</c> or
/// <c>USER(container)</c> with containers c1 and c2 of session A and c3 of session B; <c>dev</c> is
/// the driver bound to 03:00.1. Operations act for session A unless they name B.
/// </remarks>
public sealed class OwnershipTableTests
{
    private const string Unchanged = "unchanged";
    private static readonly PciAddress Audio = PciAddress.Parse("0000:03:00.1");
    private const uint GpuGroup = 11;

    public static TheoryData<string, string, string, string> Rows => new()
    {
        // operation                  initial state                           result    final state

        // kernel driver bind (iommu_device_use_default_domain), a DMA-API driver
        { "bind ixgbe",               "NONE DEFAULT g5",                      "ok",     "KERNEL(1) DEFAULT g5 dev=ixgbe" },
        { "bind ixgbe",               "KERNEL(1) DEFAULT g5",                 "ok",     "KERNEL(2) DEFAULT g5 dev=ixgbe" },
        { "bind nvme",                "USER(A,1) BLOCKING g5",                "EBUSY",  Unchanged },
        { "bind ixgbe",               "USER(A,2) USER(c1) g5",                "EBUSY",  Unchanged },
        { "bind ixgbe",               "KERNEL(1) BLOCKING g5",                "EBUSY",  Unchanged },
        // a user owner alone refuses, whatever the domain
        { "bind ixgbe",               "USER(A,1) DEFAULT g5",                 "EBUSY",  Unchanged },
        // owner_cnt == 0: the EBUSY condition needs owner_cnt > 0, so a non-default domain alone does not refuse
        { "bind ixgbe",               "NONE BLOCKING g5",                     "ok",     "KERNEL(1) BLOCKING g5 dev=ixgbe" },

        // bind of a driver_managed_dma driver: no ownership change, in any state
        { "bind vfio-pci",            "NONE DEFAULT g5",                      "ok",     "NONE DEFAULT g5 dev=vfio-pci" },
        { "bind vfio-pci",            "KERNEL(2) DEFAULT g5",                 "ok",     "KERNEL(2) DEFAULT g5 dev=vfio-pci" },
        { "bind vfio-pci",            "USER(A,1) USER(c1) g5",                "ok",     "USER(A,1) USER(c1) g5 dev=vfio-pci" },
        { "bind pci-stub",            "USER(B,1) BLOCKING g5",                "ok",     "USER(B,1) BLOCKING g5 dev=pci-stub" },
        { "bind pcieport",            "KERNEL(1) BLOCKING g5",                "ok",     "KERNEL(1) BLOCKING g5 dev=pcieport" },

        // kernel driver unbind
        { "unbind",                   "KERNEL(2) DEFAULT g5 dev=ixgbe",       "ok",     "KERNEL(1) DEFAULT g5" },
        { "unbind",                   "KERNEL(1) DEFAULT g5 dev=nvme",        "ok",     "NONE DEFAULT g5" },
        { "unbind",                   "USER(A,1) USER(c1) g5 dev=vfio-pci",   "ok",     "USER(A,1) USER(c1) g5" },
        { "unbind",                   "KERNEL(1) DEFAULT g5 dev=pci-stub",    "ok",     "KERNEL(1) DEFAULT g5" },

        // group claim (iommu_group_claim_dma_owner)
        { "group-claim",              "KERNEL(1) DEFAULT g5",                 "EPERM",  Unchanged },
        { "group-claim",              "USER(B,1) USER(c3) g5",                "EPERM",  Unchanged },
        { "group-claim",              "USER(A,1) USER(c1) g5",                "EPERM",  Unchanged },
        { "group-claim",              "NONE BLOCKING g5",                     "EBUSY",  Unchanged },
        { "group-claim",              "NONE DEFAULT g5",                      "ok",     "USER(A,1) BLOCKING g6" },
        { "group-claim",              "NONE DEFAULT g5 dev=vfio-pci",         "ok",     "USER(A,1) BLOCKING g6 dev=vfio-pci" },

        // device claim (iommu_device_claim_dma_owner)
        { "device-claim",             "KERNEL(1) DEFAULT g5",                 "EPERM",  Unchanged },
        { "device-claim",             "USER(B,1) USER(c3) g5",                "EPERM",  Unchanged },
        { "device-claim",             "USER(A,1) USER(c1) g5",                "ok",     "USER(A,2) USER(c1) g5" },
        { "device-claim",             "NONE BLOCKING g5",                     "EBUSY",  Unchanged },
        { "device-claim",             "NONE DEFAULT g5",                      "ok",     "USER(A,1) BLOCKING g6" },

        // group release: whatever the count
        { "group-release",            "USER(A,1) BLOCKING g5",                "ok",     "NONE DEFAULT g5" },
        { "group-release",            "USER(A,3) USER(c1) g5",                "ok",     "NONE DEFAULT g5" },

        // device release
        { "device-release",           "USER(A,2) USER(c1) g5",                "ok",     "USER(A,1) USER(c1) g5" },
        { "device-release",           "USER(A,1) USER(c1) g5",                "ok",     "NONE DEFAULT g5" },

        // attach a container's user domain to a user-owned group
        { "attach c1",                "USER(A,1) BLOCKING g5",                "ok",     "USER(A,1) USER(c1) g5" },
        { "attach c1",                "USER(A,1) DEFAULT g5",                 "ok",     "USER(A,1) USER(c1) g5" },
        { "attach c2",                "USER(A,1) USER(c1) g5",                "EBUSY",  Unchanged },
        { "attach c1",                "NONE DEFAULT g5",                      "EINVAL", Unchanged },

        // detach the user domain: never straight back to DEFAULT while owned
        { "detach",                   "USER(A,1) USER(c1) g5",                "ok",     "USER(A,1) BLOCKING g5" },
        { "detach",                   "USER(A,2) USER(c1) g5",                "ok",     "USER(A,2) BLOCKING g5" },

        // release or unbind of something not held: an error, never a state change or a negative count
        { "unbind",                   "NONE DEFAULT g5",                      "EINVAL", Unchanged },
        { "unbind",                   "NONE DEFAULT g5 dev=nvme",             "EINVAL", Unchanged },
        { "group-release",            "NONE DEFAULT g5",                      "EINVAL", Unchanged },
        { "group-release",            "KERNEL(1) DEFAULT g5",                 "EINVAL", Unchanged },
        { "group-release",            "USER(B,1) USER(c3) g5",                "EINVAL", Unchanged },
        { "device-release",           "NONE DEFAULT g5",                      "EINVAL", Unchanged },
        { "device-release",           "KERNEL(2) DEFAULT g5",                 "EINVAL", Unchanged },
        { "device-release B",         "USER(A,2) USER(c1) g5",                "EINVAL", Unchanged },
        { "detach",                   "USER(A,1) BLOCKING g5",                "EINVAL", Unchanged },
        { "detach",                   "NONE DEFAULT g5",                      "EINVAL", Unchanged },
    };

    [Theory]
    [MemberData(nameof(Rows))]
    public async Task Operation_InState_GivesSpecResultAndState(string operation, string initial, string result, string final)
    {
        await using var world = new World();
        world.Set(initial);
        Assert.Equal(initial, world.Render());
        var revision = world.Broker.Journal.Current.Revision;

        var errno = CoreState.ErrnoOf(() => world.Run(operation));

        Assert.Equal(result, errno?.ToString() ?? "ok");
        Assert.Equal(final == Unchanged ? initial : final, world.Render());
        if (errno is not null)
            Assert.Equal(revision, world.Broker.Journal.Current.Revision);
    }

    [Fact]
    public async Task BindDriver_DmaApiDriverRejected_LeavesDeviceUnboundAndPublishesNothing()
    {
        await using var world = new World();
        world.Set("USER(A,1) USER(c1) g1");
        var revision = world.Broker.Journal.Current.Revision;

        var e = Assert.Throws<ErrnoException>(() => world.Broker.Table.BindDriver(Audio, "snd_hda_intel"));

        Assert.Equal(Errno.EBUSY, e.Errno);
        Assert.Equal(ErrorKind.FailedPrecondition, e.Kind);
        Assert.Null(world.Broker.Table.GetDevice(Audio).Driver);
        Assert.Equal(revision, world.Broker.Journal.Current.Revision);
        Assert.Null(world.Broker.Journal.Current.Devices[Audio].Driver);
    }

    [Fact]
    public void BindDriver_DeviceAlreadyBound_FailsEbusyAndKeepsDriver()
    {
        var table = new OwnershipTable(TopologyDocument.Default());
        var nvme = PciAddress.Parse("0000:01:00.0");

        var e = Assert.Throws<ErrnoException>(() => table.BindDriver(nvme, "vfio-pci"));

        Assert.Equal(Errno.EBUSY, e.Errno);
        Assert.Equal("nvme", table.GetDevice(nvme).Driver);
        Assert.Equal(1, table.GetGroup(9).OwnerCount);
    }

    [Theory]
    [InlineData("")]
    [InlineData("VFIO")]
    [InlineData("vfio pci")]
    [InlineData("a-driver-name-far-longer-than-32-chars")]
    public void BindDriver_MalformedDriverName_FailsEinval(string driver)
    {
        var table = new OwnershipTable(TopologyDocument.Default());

        var e = Assert.Throws<ErrnoException>(() => table.BindDriver(Audio, driver));

        Assert.Equal(Errno.EINVAL, e.Errno);
        Assert.Equal(ErrorKind.InvalidArgument, e.Kind);
        Assert.Null(table.GetDevice(Audio).Driver);
    }

    [Fact]
    public void BindDriver_UnknownDevice_FailsEnodev()
    {
        var table = new OwnershipTable(TopologyDocument.Default());

        var e = Assert.Throws<ErrnoException>(() => table.BindDriver(PciAddress.Parse("0000:0f:00.0"), "vfio-pci"));

        Assert.Equal(Errno.ENODEV, e.Errno);
        Assert.Equal(ErrorKind.NotFound, e.Kind);
    }

    /// <summary>A broker on the default topology with two sessions, three containers and the GPU group at hand.</summary>
    private sealed class World : IAsyncDisposable
    {
        private readonly Dictionary<string, Session> _sessions;
        private readonly Dictionary<string, Container> _containers;

        public World()
        {
            Broker = new Broker(TopologyDocument.Default(), null, new Microsoft.Extensions.Time.Testing.FakeTimeProvider());
            var a = Broker.Sessions.Open("A");
            var b = Broker.Sessions.Open("B");
            _sessions = new() { ["A"] = a, ["B"] = b };
            _containers = new()
            {
                ["c1"] = Broker.Vfio.CreateContainer(a, ContainerType.Type1v2),
                ["c2"] = Broker.Vfio.CreateContainer(a, ContainerType.Iommufd),
                ["c3"] = Broker.Vfio.CreateContainer(b, ContainerType.Type1v2),
            };
            Group = Broker.Table.GetGroup(GpuGroup);
            Device = Broker.Table.GetDevice(Audio);
        }

        public Broker Broker { get; }
        public IommuGroup Group { get; }
        public PciDevice Device { get; }

        /// <summary>Puts the group and 03:00.1 into a state written in the table's notation.</summary>
        public void Set(string state)
        {
            var parts = state.Split(' ');
            var (owner, count) = ParseOwner(parts[0]);
            lock (Group.Sync)
            {
                Group.Owner = owner is null ? null : _sessions[owner];
                Group.OwnerCount = count;
                (Group.Domain, Group.Attached) = parts[1] switch
                {
                    "DEFAULT" => (DomainKind.Default, (Container?)null),
                    "BLOCKING" => (DomainKind.Blocking, null),
                    var user => (DomainKind.User, _containers[Inside(user, "USER")]),
                };
                Group.Generation = ulong.Parse(parts[2][1..], System.Globalization.CultureInfo.InvariantCulture);
                Device.Driver = parts.Length > 3 ? parts[3]["dev=".Length..] : null;
            }
        }

        /// <summary>The group and 03:00.1 in the table's notation; shows any inconsistency rather than hiding it.</summary>
        public string Render()
        {
            lock (Group.Sync)
            {
                var owner = Group.Owner is { } s
                    ? $"USER({Name(_sessions, s)},{Group.OwnerCount})"
                    : Group.OwnerCount == 0 ? "NONE" : $"KERNEL({Group.OwnerCount})";
                var domain = Group.Domain switch
                {
                    DomainKind.User => $"USER({(Group.Attached is { } c ? Name(_containers, c) : "?")})",
                    var d => d.ToString().ToUpperInvariant() + (Group.Attached is { } c ? $"+{Name(_containers, c)}" : ""),
                };
                var dev = Device.Driver is { } driver ? $" dev={driver}" : "";
                return $"{owner} {domain} g{Group.Generation}{dev}";
            }
        }

        public void Run(string operation)
        {
            var parts = operation.Split(' ');
            var session = _sessions[parts.Length > 1 && _sessions.ContainsKey(parts[1]) ? parts[1] : "A"];
            switch (parts[0])
            {
                case "bind":
                    Broker.Table.BindDriver(Audio, parts[1]);
                    return;
                case "unbind":
                    Broker.Table.UnbindDriver(Audio);
                    return;
            }
            lock (Group.Sync)
            {
                switch (parts[0])
                {
                    case "group-claim": Group.ClaimGroup(session); break;
                    case "device-claim": Group.ClaimDevice(session); break;
                    case "group-release": Group.ReleaseGroup(session); break;
                    case "device-release": Group.ReleaseDevice(session); break;
                    case "attach": Group.AttachUserDomain(_containers[parts[1]]); break;
                    case "detach": Group.DetachUserDomain(); break;
                    default: throw new ArgumentException($"unknown operation '{operation}'", nameof(operation));
                }
            }
        }

        private static (string? Owner, int Count) ParseOwner(string text)
        {
            if (text == "NONE")
                return (null, 0);
            if (text.StartsWith("KERNEL", StringComparison.Ordinal))
                return (null, int.Parse(Inside(text, "KERNEL"), System.Globalization.CultureInfo.InvariantCulture));
            var args = Inside(text, "USER").Split(',');
            return (args[0], int.Parse(args[1], System.Globalization.CultureInfo.InvariantCulture));
        }

        private static string Inside(string text, string head) => text[(head.Length + 1)..^1];

        private static string Name<T>(Dictionary<string, T> names, object value) =>
            names.FirstOrDefault(kv => ReferenceEquals(kv.Value, value)).Key ?? "?";

        public async ValueTask DisposeAsync()
        {
            // The rows leave hand-made states behind; teardown must not trip over them.
            lock (Group.Sync)
            {
                Group.Owner = null;
                Group.OwnerCount = 0;
                Group.Attached = null;
                Group.Domain = DomainKind.Default;
            }
            await Broker.DisposeAsync();
        }
    }
}

using System.Globalization;
using DmaBroker.Client;
using DmaBroker.Protocol;
using DmaBroker.Protocol.V1;
using Google.Protobuf;
using Google.Protobuf.Reflection;
using Grpc.Core;
using Grpc.Net.Client;
using static DmaBroker.Server.Tests.Errors;

namespace DmaBroker.Server.Tests;

/// <summary>
/// SPEC §9, §10 and §12 from the attacker's side: every way a principal or a session could touch
/// what another session holds — its containers, device handles, memory, groups, devices, DMA
/// stream, token or the session itself — is refused with the exact status and errno of the
/// contract (protos/dmabroker/v1), and the victim finds everything as it was: its bytes, its
/// groups with the same generation, its mappings and handle still working (a DMA through its
/// stream succeeds), and the broker's counts unchanged.
/// <para>
/// Two attackers: mallory, another principal; and a sibling, a second session of the victim's own
/// principal. A session owns resources, as a Linux <c>struct file</c> does, so the sibling is
/// refused exactly as mallory is; the principal is the boundary only for session tokens and
/// revocation (SPEC §12), where the sibling is allowed by design and so not attacked here.
/// </para>
/// </summary>
public sealed class AttackTests
{
    private const string VictimToken = "victim-token";
    private const string MalloryToken = "mallory-token";
    private const string RootToken = "root-token";
    // The victim claims this one with SetContainer, opens it and runs a DMA stream on it...
    private const string VictimDevice = "0000:08:00.0";
    // ...and holds this one with BindDevice in an IOAS.
    private const string VictimBoundDevice = "0000:09:00.0";
    private const string MalloryDevice = "0000:0a:00.0";
    private const string FreeDevice = "0000:0b:00.0";
    private const ulong DataIova = 0x10_0000;
    private const ulong Page = WireConstants.PageSize;
    private const ulong EduId = 0x010000ed;
    private const ulong BusMaster = WireConstants.PciCommandBusMaster;
    private const string Mallory = "mallory";
    private const string Sibling = "sibling";

    private static readonly string Auth = $$"""
        {
          "principals": [
            { "name": "token:victim", "token_sha256": "{{SecureBroker.Sha256(VictimToken)}}", "roles": ["user"] },
            { "name": "token:mallory", "token_sha256": "{{SecureBroker.Sha256(MalloryToken)}}", "roles": ["user"] },
            { "name": "token:root", "token_sha256": "{{SecureBroker.Sha256(RootToken)}}", "roles": ["admin"] },
            { "name": "anonymous", "roles": ["viewer"] }
          ]
        }
        """;

    /// <summary>Two pages the victim maps at <see cref="DataIova"/>.</summary>
    private static readonly byte[] DataBytes = [.. Enumerable.Range(0, 2 * (int)Page).Select(i => (byte)((i * 7) + 3))];

    /// <summary>One page the victim keeps to itself (mapped read-only in its IOAS); no byte is zero, so a stray write of zeros shows.</summary>
    private static readonly byte[] SecretBytes = [.. Enumerable.Range(0, (int)Page).Select(i => (byte)("victim's secret "[i % 16]))];

    private static readonly ServiceDescriptor[] Services =
        [Topology.Descriptor, Kernel.Descriptor, Session.Descriptor, Vfio.Descriptor, Memory.Descriptor, Dma.Descriptor];

    /// <summary>The services whose calls act as a session, with its token.</summary>
    private static readonly ServiceDescriptor[] SessionServices = [Vfio.Descriptor, Memory.Descriptor, Dma.Descriptor];

    private static readonly MethodDescriptor DmaStream = Method(Dma.Descriptor.Name, "Stream");

    private sealed record Attack(Errno Errno, StatusCode Code, Func<Scene, Attacker, Task> Run, bool BySibling = true);

    /// <summary>Direct attacks with the victim's ids, from the attacker's own session, and what each must get.</summary>
    private static readonly Dictionary<string, Attack> Attacks = new()
    {
        // Container ids are global numbers, but a container is found only among the caller's own.
        ["MapDma of its own memory into the victim's container"] = new(Errno.ENOENT, StatusCode.NotFound, (s, a) => Call(() => a.Vfio.MapDmaAsync(
            new MapDmaRequest { ContainerId = s.Victim.Type1.Id, Vaddr = a.Own.Vaddr, Iova = 0x40_0000, Size = Page, Read = true, Write = true }, cancellationToken: s.Ct).ResponseAsync)),
        ["UnmapDma of everything in the victim's container"] = new(Errno.ENOENT, StatusCode.NotFound, (s, a) => Call(() => a.Vfio.UnmapDmaAsync(
            new UnmapDmaRequest { ContainerId = s.Victim.Type1.Id, All = true }, cancellationToken: s.Ct).ResponseAsync)),
        ["UnmapDma of the victim's IOAS mapping"] = new(Errno.ENOENT, StatusCode.NotFound, (s, a) => Call(() => a.Vfio.UnmapDmaAsync(
            new UnmapDmaRequest { ContainerId = s.Victim.Ioas.Id, Iova = s.Victim.SecretIova, Size = Page }, cancellationToken: s.Ct).ResponseAsync)),
        ["GetIommuInfo of the victim's container"] = new(Errno.ENOENT, StatusCode.NotFound, (s, a) => Call(() => a.Vfio.GetIommuInfoAsync(
            new GetIommuInfoRequest { ContainerId = s.Victim.Type1.Id }, cancellationToken: s.Ct).ResponseAsync)),
        ["DestroyContainer of the victim's IOAS"] = new(Errno.ENOENT, StatusCode.NotFound, (s, a) => Call(() => a.Vfio.DestroyContainerAsync(
            new DestroyContainerRequest { ContainerId = s.Victim.Ioas.Id }, cancellationToken: s.Ct).ResponseAsync)),
        ["SetContainer of a free group into the victim's container"] = new(Errno.ENOENT, StatusCode.NotFound, (s, a) => Call(() => a.Vfio.SetContainerAsync(
            new SetContainerRequest { GroupId = s.GroupOf(FreeDevice), ContainerId = s.Victim.Type1.Id }, cancellationToken: s.Ct).ResponseAsync)),
        ["BindDevice of a free device into the victim's IOAS"] = new(Errno.ENOENT, StatusCode.NotFound, (s, a) => Call(() => a.Vfio.BindDeviceAsync(
            new BindDeviceRequest { Address = FreeDevice, ContainerId = s.Victim.Ioas.Id }, cancellationToken: s.Ct).ResponseAsync)),

        // A device handle is a file descriptor: one the caller has not opened is EBADF.
        ["CloseDevice of the victim's handle"] = new(Errno.EBADF, StatusCode.NotFound, (s, a) => Call(() => a.Vfio.CloseDeviceAsync(
            new CloseDeviceRequest { Handle = s.Victim.Device.Handle }, cancellationToken: s.Ct).ResponseAsync)),
        ["ResetDevice of the victim's handle"] = new(Errno.EBADF, StatusCode.NotFound, (s, a) => Call(() => a.Vfio.ResetDeviceAsync(
            new ResetDeviceRequest { Handle = s.Victim.Device.Handle }, cancellationToken: s.Ct).ResponseAsync)),
        ["RegionRead of config space through the victim's handle"] = new(Errno.EBADF, StatusCode.NotFound, (s, a) => Call(() => a.Vfio.RegionReadAsync(
            new RegionReadRequest { Handle = s.Victim.Device.Handle, Index = WireConstants.ConfigRegion, Offset = 0, Size = 4 }, cancellationToken: s.Ct).ResponseAsync)),
        ["RegionWrite clearing Bus Master through the victim's handle"] = new(Errno.EBADF, StatusCode.NotFound, (s, a) => Call(() => a.Vfio.RegionWriteAsync(
            new RegionWriteRequest { Handle = s.Victim.Device.Handle, Index = WireConstants.ConfigRegion, Offset = WireConstants.PciCommandRegister, Data = ByteString.CopyFrom(0, 0) },
            cancellationToken: s.Ct).ResponseAsync)),
        ["Dma.Stream opened on the victim's handle"] = new(Errno.EBADF, StatusCode.NotFound, (s, a) => s.InvokeAsync(
            DmaStream, new DmaRequest { Open = new DmaOpen { Handle = s.Victim.Device.Handle } }, a.Bearer, a.Session.Token)),

        // The victim's groups and devices: held by another session.
        ["SetContainer of the victim's group"] = new(Errno.EINVAL, StatusCode.FailedPrecondition, (s, a) => Call(() => a.Vfio.SetContainerAsync(
            new SetContainerRequest { GroupId = s.Victim.Group, ContainerId = a.Type1.Id }, cancellationToken: s.Ct).ResponseAsync)),
        ["UnsetContainer of the victim's group"] = new(Errno.EINVAL, StatusCode.FailedPrecondition, (s, a) => Call(() => a.Vfio.UnsetContainerAsync(
            new UnsetContainerRequest { GroupId = s.Victim.Group }, cancellationToken: s.Ct).ResponseAsync)),
        ["UnsetContainer of the group the victim holds by BindDevice"] = new(Errno.EINVAL, StatusCode.FailedPrecondition, (s, a) => Call(() => a.Vfio.UnsetContainerAsync(
            new UnsetContainerRequest { GroupId = s.Victim.BoundGroup }, cancellationToken: s.Ct).ResponseAsync)),
        ["BindDevice of the victim's open device"] = new(Errno.EPERM, StatusCode.PermissionDenied, (s, a) => Call(() => a.Vfio.BindDeviceAsync(
            new BindDeviceRequest { Address = VictimDevice, ContainerId = a.Ioas.Id }, cancellationToken: s.Ct).ResponseAsync)),
        ["BindDevice of the victim's bound device"] = new(Errno.EPERM, StatusCode.PermissionDenied, (s, a) => Call(() => a.Vfio.BindDeviceAsync(
            new BindDeviceRequest { Address = VictimBoundDevice, ContainerId = a.Ioas.Id }, cancellationToken: s.Ct).ResponseAsync)),
        ["UnbindDevice of the victim's bound device"] = new(Errno.EINVAL, StatusCode.FailedPrecondition, (s, a) => Call(() => a.Vfio.UnbindDeviceAsync(
            new UnbindDeviceRequest { Address = VictimBoundDevice }, cancellationToken: s.Ct).ResponseAsync)),
        ["UnbindDevice of the victim's open device"] = new(Errno.EINVAL, StatusCode.FailedPrecondition, (s, a) => Call(() => a.Vfio.UnbindDeviceAsync(
            new UnbindDeviceRequest { Address = VictimDevice }, cancellationToken: s.Ct).ResponseAsync)),
        ["OpenDevice of the victim's open device"] = new(Errno.EPERM, StatusCode.PermissionDenied, (s, a) => Call(() => a.Vfio.OpenDeviceAsync(
            new OpenDeviceRequest { Address = VictimDevice }, cancellationToken: s.Ct).ResponseAsync)),
        ["OpenDevice of the victim's bound device"] = new(Errno.EPERM, StatusCode.PermissionDenied, (s, a) => Call(() => a.Vfio.OpenDeviceAsync(
            new OpenDeviceRequest { Address = VictimBoundDevice }, cancellationToken: s.Ct).ResponseAsync)),

        // Memory: each session has its own address space, where the victim's secret block is not allocated.
        ["Memory.Read of the victim's secret"] = new(Errno.EFAULT, StatusCode.InvalidArgument, (s, a) => Call(() => a.Memory.ReadAsync(
            new ReadRequest { Vaddr = s.Victim.Secret.Vaddr, Size = (uint)Page }, cancellationToken: s.Ct).ResponseAsync)),
        ["Memory.Write over the victim's secret"] = new(Errno.EFAULT, StatusCode.InvalidArgument, (s, a) => Call(() => a.Memory.WriteAsync(
            new WriteRequest { Vaddr = s.Victim.Secret.Vaddr, Data = ByteString.CopyFrom(new byte[Page]) }, cancellationToken: s.Ct).ResponseAsync)),
        ["Memory.Free of the victim's secret"] = new(Errno.EINVAL, StatusCode.InvalidArgument, (s, a) => Call(() => a.Memory.FreeAsync(
            new FreeRequest { Vaddr = s.Victim.Secret.Vaddr }, cancellationToken: s.Ct).ResponseAsync)),
        ["MapDma of the victim's secret into its own IOAS"] = new(Errno.EFAULT, StatusCode.InvalidArgument, (s, a) => Call(() => a.Vfio.MapDmaAsync(
            new MapDmaRequest { ContainerId = a.Ioas.Id, Vaddr = s.Victim.Secret.Vaddr, Size = Page, Read = true, Write = true }, cancellationToken: s.Ct).ResponseAsync)),

        // The session itself: a user revokes only its own principal's sessions.
        ["RevokeSession of the victim"] = new(Errno.EACCES, StatusCode.PermissionDenied,
            (s, a) => a.Client.Admin.RevokeSessionAsync(s.Victim.Session.Id, "pwned", s.Ct), BySibling: false),
    };

    public static TheoryData<string, string> DirectAttacks()
    {
        var rows = new TheoryData<string, string>();
        foreach (var attacker in new[] { Mallory, Sibling })
        {
            foreach (var (name, attack) in Attacks.Where(a => attacker == Mallory || a.Value.BySibling))
                rows.Add(attacker, name);
        }
        return rows;
    }

    [Theory]
    [MemberData(nameof(DirectAttacks))]
    public Task DirectAttack_WithTheVictimsIds_RefusedAndNothingChanged(string attacker, string attack) =>
        RefusedAndNothingChangedAsync(scene => RunDirectAsync(scene, attacker, attack));

    private static async Task RunDirectAsync(Scene scene, string attacker, string name)
    {
        var attack = Attacks[name];
        await Expect(attack.Errno, attack.Code, () => attack.Run(scene, scene.Attackers[attacker]));
    }

    /// <summary>The callers below the admin role: mallory (a user) and anyone without a credential (a viewer).</summary>
    private static readonly Dictionary<string, (string? Bearer, string Role)> Callers = new()
    {
        ["token:mallory"] = (MalloryToken, "user"),
        ["anonymous"] = (null, "viewer"),
    };

    /// <summary>SPEC §12's roles table, the oracle here (not the broker's own table).</summary>
    private static bool RolePermits(string role, MethodDescriptor method) => (role, method.Service.Name, method.Name) switch
    {
        (_, "Topology", _) => true,
        (_, "Kernel", "GetStats" or "ListSessions") => true,
        // Issue 10 adds ListFaults to the viewer's reads (what is injected is an operator's view, as
        // sessions are); InjectFault and ClearFaults stay the admin's. SPEC §12's table is to follow.
        (_, "Kernel", "ListFaults") => true,
        ("user", "Kernel", "RevokeSession") => true,
        ("user", "Session" or "Vfio" or "Memory" or "Dma", _) => true,
        _ => false,
    };

    /// <summary>
    /// Every method of the contract a caller's role does not allow, read from the descriptors: an
    /// RPC added to Kernel is an admin RPC here until SPEC §12 says otherwise.
    /// </summary>
    public static TheoryData<string, string, string> OutsideTheRole()
    {
        var rows = new TheoryData<string, string, string>();
        foreach (var (caller, (_, role)) in Callers)
        {
            foreach (var method in Services.SelectMany(s => s.Methods).Where(m => !RolePermits(role, m)))
                rows.Add(caller, method.Service.Name, method.Name);
        }
        return rows;
    }

    [Theory]
    [MemberData(nameof(OutsideTheRole))]
    public Task Call_OutsideTheCallersRole_PermissionDeniedEaccesAndNothingChanged(string caller, string service, string method) =>
        RefusedAndNothingChangedAsync(scene => RunOutsideRoleAsync(scene, caller, service, method));

    // The caller brings the victim's session token too, and a request aimed at the victim: were the
    // role check missing, the call would land on the victim and the check afterwards would see it.
    private static async Task RunOutsideRoleAsync(Scene scene, string caller, string service, string method)
    {
        var (bearer, role) = Callers[caller];
        var descriptor = Method(service, method);
        var e = await Expect(Errno.EACCES, StatusCode.PermissionDenied,
            () => scene.InvokeAsync(descriptor, scene.AimedAt(descriptor.InputType), bearer, scene.Victim.Session.Token));
        Assert.Contains($"{caller} ({role})", e.Message, StringComparison.Ordinal);
    }

    public static TheoryData<string, string> SessionMethods()
    {
        var rows = new TheoryData<string, string>();
        foreach (var method in SessionServices.SelectMany(s => s.Methods))
            rows.Add(method.Service.Name, method.Name);
        return rows;
    }

    [Theory]
    [MemberData(nameof(SessionMethods))]
    public Task VictimsToken_PresentedByAnotherPrincipal_UnauthenticatedEaccesAndNothingChanged(string service, string method) =>
        RefusedAndNothingChangedAsync(scene => RunStolenTokenAsync(scene, service, method));

    // Exactly what an unknown token gets: a stolen token is worth nothing, and says nothing.
    private static async Task RunStolenTokenAsync(Scene scene, string service, string method)
    {
        var descriptor = Method(service, method);
        var e = await Expect(Errno.EACCES, StatusCode.Unauthenticated,
            () => scene.InvokeAsync(descriptor, scene.AimedAt(descriptor.InputType), MalloryToken, scene.Victim.Session.Token));
        Assert.Equal("unknown or ended session token", e.Message);
    }

    [Fact]
    public async Task EveryAttack_OneAfterAnother_EachRefused_VictimUnchangedAtTheEnd()
    {
        await using var scene = await Scene.StartAsync();
        foreach (var row in DirectAttacks())
            await Named($"{row[0]}: {row[1]}", () => RunDirectAsync(scene, (string)row[0], (string)row[1]));
        foreach (var row in OutsideTheRole())
            await Named($"{row[0]} calls {row[1]}.{row[2]}", () => RunOutsideRoleAsync(scene, (string)row[0], (string)row[1], (string)row[2]));
        foreach (var row in SessionMethods())
            await Named($"stolen token on {row[0]}.{row[1]}", () => RunStolenTokenAsync(scene, (string)row[0], (string)row[1]));
        await scene.AssertNothingChangedAsync();
    }

    [Fact]
    public async Task Memory_TheVictimsVaddrInAnotherSession_IsThatSessionsOwnMemory()
    {
        await using var scene = await Scene.StartAsync();
        foreach (var attacker in scene.Attackers.Values)
        {
            // Every session's first block starts at the same address, as in two processes.
            Assert.Equal(scene.Victim.Data.Vaddr, attacker.Own.Vaddr);
            Assert.Equal(new byte[Page], await attacker.Own.ReadAsync(0, (int)Page, scene.Ct));
            var mine = Enumerable.Repeat((byte)0x55, (int)Page).ToArray();
            await attacker.Own.WriteAsync(0, mine, scene.Ct);
            Assert.Equal(mine, await attacker.Own.ReadAsync(0, mine.Length, scene.Ct));
            await Expect(Errno.EFAULT, StatusCode.InvalidArgument, () => Call(() => attacker.Memory.ReadAsync(
                new ReadRequest { Vaddr = scene.Victim.Data.Vaddr + Page, Size = (uint)Page }, cancellationToken: scene.Ct).ResponseAsync));
        }
        await scene.AssertNothingChangedAsync();
    }

    [Fact]
    public async Task Dma_AttackersDeviceAtTheVictimsIova_FaultsUnmapped_ItsOwnMappingThereIsItsOwn()
    {
        await using var scene = await Scene.StartAsync();
        var mallory = scene.Attackers[Mallory];
        await mallory.Type1.SetGroupAsync(scene.GroupOf(MalloryDevice), scene.Ct);
        var device = await mallory.Session.OpenDeviceAsync(MalloryDevice, scene.Ct);
        await device.EnableBusMasterAsync(scene.Ct);
        await using var dma = await device.OpenDmaChannelAsync(cancellationToken: scene.Ct);

        var write = await dma.WriteAsync(DataIova, new byte[Page], scene.Ct).WaitAsync(TestBroker.Timeout, scene.Ct);
        var read = await dma.ReadAsync(DataIova, (int)Page, scene.Ct).WaitAsync(TestBroker.Timeout, scene.Ct);
        Assert.Equal((FaultReason.Unmapped, Access.Write), (write.Fault?.Reason, write.Fault?.Access));
        Assert.Equal((FaultReason.Unmapped, Access.Read), (read.Fault?.Reason, read.Fault?.Access));
        Assert.True(read.Data.IsEmpty);

        // The same IOVA in mallory's own domain is mallory's own memory.
        var mine = Enumerable.Repeat((byte)0xAA, (int)Page).ToArray();
        await mallory.Type1.MapAsync(mallory.Own, DataIova, cancellationToken: scene.Ct);
        (await dma.WriteAsync(DataIova, mine, scene.Ct).WaitAsync(TestBroker.Timeout, scene.Ct)).EnsureOk();
        Assert.Equal(mine, await mallory.Own.ReadAsync(0, mine.Length, scene.Ct));
        await scene.AssertVictimIntactAsync();
    }

    [Fact]
    public async Task Views_OfOtherPrincipalsAndViewers_ShowTheVictimsSessionButNeverItsToken()
    {
        await using var scene = await Scene.StartAsync();
        var mallory = scene.Attackers[Mallory];
        var anonymous = scene.Broker.Connect();
        // A user sees its own sessions only; a viewer sees all, as SPEC §12 says, without their secrets.
        Assert.Equal([mallory.Session.Id], (await mallory.Client.Admin.ListSessionsAsync(scene.Ct)).Select(s => s.SessionId));
        var seen = await anonymous.Admin.ListSessionsAsync(scene.Ct);
        Assert.Contains(scene.Victim.Session.Id, seen.Select(s => s.SessionId));
        var views = new List<IMessage>(seen)
        {
            await anonymous.ListGroupsAsync(scene.Ct),
            await anonymous.ListDevicesAsync(scene.Ct),
            await anonymous.Admin.GetStatsAsync(scene.Ct),
            await mallory.Client.ListGroupsAsync(scene.Ct),
        };
        Assert.All(views, view => Assert.DoesNotContain(scene.Victim.Session.Token, view.ToString(), StringComparison.Ordinal));
        // VFIO_GROUP_GET_STATUS of the victim's group: neither viable nor set, for another session.
        foreach (var attacker in scene.Attackers.Values)
            Assert.Equal(new GroupStatus(), await attacker.Session.GetGroupStatusAsync(scene.Victim.Group, scene.Ct));
        await scene.AssertNothingChangedAsync();
    }

    /// <summary>One attack against a fresh victim, then the check that it changed nothing.</summary>
    private static async Task RefusedAndNothingChangedAsync(Func<Scene, Task> attack)
    {
        await using var scene = await Scene.StartAsync();
        await attack(scene);
        await scene.AssertNothingChangedAsync();
    }

    private static MethodDescriptor Method(string service, string method) =>
        Services.Single(s => s.Name == service).Methods.Single(m => m.Name == method);

    private static async Task Named(string attack, Func<Task> run)
    {
        try
        {
            await run();
        }
        catch (Exception e) when (e is not OperationCanceledException)
        {
            throw new Xunit.Sdk.XunitException($"{attack}: {e.Message}");
        }
    }

    private sealed record Victim(BrokerSession Session, Container Type1, Container Ioas, uint Group, uint BoundGroup,
        DmaBuffer Data, DmaBuffer Secret, ulong SecretIova, VfioDevice Device, DmaChannel Channel);

    private sealed record Attacker(BrokerClient Client, string Bearer, BrokerSession Session, Container Type1, Container Ioas, DmaBuffer Own)
    {
        public Vfio.VfioClient Vfio => Session.Raw.Vfio;

        public Memory.MemoryClient Memory => Session.Raw.Memory;
    }

    /// <summary>What the victim holds as the broker reports it, and the broker's counts.</summary>
    private sealed record Snapshot(VictimView Victim, BrokerStats Stats, string Sessions);

    private sealed record VictimView(Group Group, Group BoundGroup, IommuInfo Type1, IommuInfo Ioas, string Listed);

    /// <summary>
    /// A broker with the victim set up and both attackers' sessions open, each with a page of memory
    /// and two empty containers; every call bounded by one budget.
    /// </summary>
    private sealed class Scene : IAsyncDisposable
    {
        private readonly CancellationTokenSource _budget = new(TimeSpan.FromSeconds(30));
        private readonly Dictionary<string, uint> _groups = [];
        private readonly Dictionary<string, object> _aim = [];
        private readonly GrpcChannel _channel;

        private Scene(SecureBroker broker)
        {
            Broker = broker;
            Root = broker.Connect(RootToken);
            _channel = broker.Connect().Raw.Channel;
        }

        public SecureBroker Broker { get; }
        public BrokerClient Root { get; }
        public CancellationToken Ct => _budget.Token;
        public Victim Victim { get; private set; } = null!;
        public Dictionary<string, Attacker> Attackers { get; } = [];
        public Snapshot Before { get; private set; } = null!;

        public uint GroupOf(string address) => _groups[address];

        public static async Task<Scene> StartAsync()
        {
            var scene = new Scene(await SecureBroker.StartAsync(Auth));
            try
            {
                await scene.SetUpAsync();
                return scene;
            }
            catch
            {
                await scene.DisposeAsync();
                throw;
            }
        }

        private async Task SetUpAsync()
        {
            foreach (var pci in (await Root.ListDevicesAsync(Ct)).Devices)
                _groups[pci.Address] = pci.GroupId;
            var victims = Broker.Connect(VictimToken);
            var session = await victims.OpenSessionAsync("victim", Ct);
            var type1 = await session.NewContainerAsync(ContainerType.Type1V2, Ct);
            await type1.SetGroupAsync(GroupOf(VictimDevice), Ct);
            var data = await session.AllocateAsync((ulong)DataBytes.Length, Ct);
            await data.WriteAsync(0, DataBytes, Ct);
            await type1.MapAsync(data, DataIova, cancellationToken: Ct);
            var secret = await session.AllocateAsync(Page, Ct);
            await secret.WriteAsync(0, SecretBytes, Ct);
            var ioas = await session.NewContainerAsync(ContainerType.Iommufd, Ct);
            await ioas.BindDeviceAsync(VictimBoundDevice, Ct);
            var secretIova = (await ioas.MapAsync(secret, iova: null, write: false, cancellationToken: Ct)).Iova;
            var device = await session.OpenDeviceAsync(VictimDevice, Ct);
            await device.EnableBusMasterAsync(Ct);
            var channel = await device.OpenDmaChannelAsync(cancellationToken: Ct);
            // OpenDmaChannelAsync returns once the open is sent; the broker counts the stream when its
            // handler starts, which may come after a later call on the connection has read the counts.
            // The stream's first completion comes after that: only then is the victim's state settled.
            Assert.Equal(EduId, (await channel.MmioReadAsync(0, 0, cancellationToken: Ct).WaitAsync(TestBroker.Timeout, Ct)).EnsureOk().Value);
            Victim = new Victim(session, type1, ioas, GroupOf(VictimDevice), GroupOf(VictimBoundDevice), data, secret, secretIova, device, channel);
            Attackers[Mallory] = await AttackerAsync(Broker.Connect(MalloryToken), MalloryToken);
            Attackers[Sibling] = await AttackerAsync(victims, VictimToken);

            // What a request aimed at the victim names, by field name (see AimedAt).
            _aim["address"] = VictimDevice;
            _aim["driver"] = "nvme";
            _aim["model"] = "edu";
            _aim["session_id"] = session.Id;
            _aim["group_id"] = Victim.Group;
            _aim["container_id"] = type1.Id;
            _aim["handle"] = device.Handle;
            _aim["vaddr"] = secret.Vaddr;
            _aim["iova"] = DataIova;
            _aim["size"] = Page;
            _aim["index"] = WireConstants.ConfigRegion;
            _aim["offset"] = WireConstants.PciCommandRegister;
            _aim["data"] = ByteString.CopyFrom(0, 0);
            _aim["reason"] = "pwned";
            _aim["client_name"] = "mallory";
            Before = await CaptureAsync();
        }

        private async Task<Attacker> AttackerAsync(BrokerClient client, string bearer)
        {
            var session = await client.OpenSessionAsync("attacker", Ct);
            var own = await session.AllocateAsync(Page, Ct);
            return new Attacker(client, bearer, session,
                await session.NewContainerAsync(ContainerType.Type1V2, Ct), await session.NewContainerAsync(ContainerType.Iommufd, Ct), own);
        }

        /// <summary>
        /// A request of <paramref name="type"/> aimed at the victim: every field that names something
        /// (a device, group, container, handle, vaddr, IOVA, session) names the victim's, so a call
        /// let through by mistake would change what <see cref="AssertNothingChangedAsync"/> checks.
        /// </summary>
        public IMessage AimedAt(MessageDescriptor type)
        {
            if (type == DmaRequest.Descriptor)
                return new DmaRequest { Open = new DmaOpen { Handle = Victim.Device.Handle } };
            var request = type.Parser.ParseFrom(ByteString.Empty);
            foreach (var field in type.Fields.InDeclarationOrder())
            {
                if (!_aim.TryGetValue(field.Name, out var value))
                    continue;
                field.Accessor.SetValue(request, field.FieldType switch
                {
                    FieldType.UInt64 => Convert.ToUInt64(value, CultureInfo.InvariantCulture),
                    FieldType.UInt32 => Convert.ToUInt32(value, CultureInfo.InvariantCulture),
                    _ => value,
                });
            }
            return request;
        }

        /// <summary>
        /// Calls any method of the contract by its descriptor with the given credentials, as a duplex
        /// stream (on the wire the kinds differ only in how many messages flow), and reads to its end.
        /// </summary>
        public async Task InvokeAsync(MethodDescriptor method, IMessage request, string? bearer, string? sessionToken)
        {
            var headers = new Metadata();
            if (bearer is not null)
                headers.Add("authorization", $"Bearer {bearer}");
            if (sessionToken is not null)
                headers.Add(WireConstants.SessionTokenHeader, sessionToken);
            var call = new Method<IMessage, IMessage>(MethodType.DuplexStreaming, method.Service.FullName, method.Name,
                Marshaller(method.InputType), Marshaller(method.OutputType));
            using var stream = _channel.CreateCallInvoker().AsyncDuplexStreamingCall(call, null, new CallOptions(headers, cancellationToken: Ct));
            try
            {
                await stream.RequestStream.WriteAsync(request, Ct);
                await stream.RequestStream.CompleteAsync();
            }
            catch (Exception e) when (e is RpcException or InvalidOperationException)
            {
                // Refused before the broker read the request: the status is read below.
            }
            try
            {
                while (await stream.ResponseStream.MoveNext(Ct))
                {
                    // A call let through answers; Expect then fails for want of an error.
                }
            }
            catch (RpcException e)
            {
                throw BrokerException.From(e);
            }
        }

        private static Marshaller<IMessage> Marshaller(MessageDescriptor type) =>
            Marshallers.Create(message => message.ToByteArray(), type.Parser.ParseFrom);

        private async Task<Snapshot> CaptureAsync()
        {
            var sessions = (await Root.Admin.ListSessionsAsync(Ct))
                .Select(s => $"{s.SessionId} {s.Principal} groups [{string.Join(' ', s.Groups)}] memory {s.MemoryBytes} dma streams {s.DmaStreams}")
                .ToList();
            var victim = new VictimView(
                await Root.GetGroupAsync(Victim.Group, Ct),
                await Root.GetGroupAsync(Victim.BoundGroup, Ct),
                await Victim.Type1.GetInfoAsync(Ct),
                await Victim.Ioas.GetInfoAsync(Ct),
                sessions.Single(s => s.StartsWith($"{Victim.Session.Id} ", StringComparison.Ordinal)));
            return new Snapshot(victim, await Root.Admin.GetStatsAsync(Ct), string.Join('\n', sessions));
        }

        /// <summary>The victim's state as it was, and its memory, mappings, handle and stream still working.</summary>
        public async Task AssertVictimIntactAsync()
        {
            Assert.False(Victim.Session.Ended.IsCompleted, "the victim's session ended");
            Assert.Equal(Before.Victim, (await CaptureAsync()).Victim);
            Assert.Equal(DataBytes, await Victim.Data.ReadAsync(0, DataBytes.Length, Ct));
            Assert.Equal(SecretBytes, await Victim.Secret.ReadAsync(0, SecretBytes.Length, Ct));
            Assert.Equal(new GroupStatus { Viable = true, ContainerSet = true }, await Victim.Session.GetGroupStatusAsync(Victim.Group, Ct));
            // Its device was not reset (Bus Master still on) and DMA through its stream and mapping still works.
            Assert.Equal(BusMaster, await Victim.Device.ReadRegisterAsync(WireConstants.ConfigRegion, WireConstants.PciCommandRegister, 2, Ct) & BusMaster);
            var id = await Victim.Channel.MmioReadAsync(0, 0, cancellationToken: Ct).WaitAsync(TestBroker.Timeout, Ct);
            Assert.Equal(EduId, id.EnsureOk().Value);
            var dma = await Victim.Channel.ReadAsync(DataIova, DataBytes.Length, Ct).WaitAsync(TestBroker.Timeout, Ct);
            Assert.Equal(DataBytes, dma.EnsureOk().Data.ToArray());
        }

        /// <summary>The victim intact, and nothing else changed either: a rejected call changes no state (SPEC §9).</summary>
        public async Task AssertNothingChangedAsync()
        {
            await AssertVictimIntactAsync();
            Assert.Equal(Before, await CaptureAsync());
        }

        public async ValueTask DisposeAsync()
        {
            if (Victim is not null)
                await Victim.Channel.DisposeAsync();
            await Broker.DisposeAsync();
            _budget.Dispose();
        }
    }
}

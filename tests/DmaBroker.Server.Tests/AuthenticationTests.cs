using DmaBroker.Client;
using Grpc.Core;
using static DmaBroker.Server.Tests.Errors;

namespace DmaBroker.Server.Tests;

/// <summary>SPEC §12 authentication through real listeners: bearer tokens, mTLS certificates, Unix socket peers, anonymous.</summary>
public sealed class AuthenticationTests
{
    private const string AdminToken = "admin-token-1";
    private const string UserToken = "user-token-1";

    private static readonly string Auth = $$"""
        {
          "principals": [
            { "name": "token:root", "token_sha256": "{{SecureBroker.Sha256(AdminToken)}}", "roles": ["admin"] },
            { "name": "token:ci", "token_sha256": "{{SecureBroker.Sha256(UserToken)}}", "roles": ["user"] },
            { "name": "cert:ops", "roles": ["admin"] },
            { "name": "cert:viewer", "roles": ["viewer"] },
            { "name": "uid:*", "roles": ["viewer"] }
          ]
        }
        """;

    [Fact]
    public async Task NoCredential_WhereOneIsRequired_UnauthenticatedEacces()
    {
        await using var broker = await SecureBroker.StartAsync(Auth);
        var e = await Expect(Errno.EACCES, StatusCode.Unauthenticated, () => broker.Connect().ListGroupsAsync());
        Assert.IsType<BrokerAuthenticationException>(e);
        Assert.Contains("anonymous", e.Message, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData("not-a-token")]
    [InlineData(UserToken + "x")]
    public async Task UnknownOrWrongBearerToken_UnauthenticatedEacces_TokenNeverEchoed(string token)
    {
        await using var broker = await SecureBroker.StartAsync(Auth);
        var e = await Expect(Errno.EACCES, StatusCode.Unauthenticated, () => broker.Connect(token).ListGroupsAsync());
        Assert.DoesNotContain(token, e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task BearerToken_IsItsPrincipal()
    {
        await using var broker = await SecureBroker.StartAsync(Auth);
        Assert.NotEmpty((await broker.Connect(UserToken).ListGroupsAsync()).Groups);
        Assert.NotEmpty((await broker.Connect(AdminToken).Admin.GetStatsAsync()).ToString());
    }

    [Fact]
    public async Task Tls_ValidClientCertificate_IsCertCn()
    {
        await using var broker = await SecureBroker.StartAsync(Auth);
        var ops = broker.ConnectTls(broker.Pki.Client("ops"));
        // cert:ops is an admin: a Kernel call passes the gate and reaches the broker (which rejects the bad address).
        await Expect(Errno.EINVAL, StatusCode.InvalidArgument, () => ops.Admin.BindDriverAsync("nonsense", "vfio-pci"));
        var viewer = broker.ConnectTls(broker.Pki.Client("viewer"));
        var e = await Expect(Errno.EACCES, StatusCode.PermissionDenied, () => viewer.Admin.BindDriverAsync("nonsense", "vfio-pci"));
        Assert.Contains("cert:viewer", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Tls_NoClientCertificate_UnauthenticatedEacces()
    {
        await using var broker = await SecureBroker.StartAsync(Auth);
        var e = await Expect(Errno.EACCES, StatusCode.Unauthenticated, () => broker.ConnectTls(null).ListGroupsAsync());
        Assert.Contains("client certificate", e.Message, StringComparison.Ordinal);
        // A bearer token does not stand in for the certificate this listener requires.
        await Expect(Errno.EACCES, StatusCode.Unauthenticated, () => broker.ConnectTls(null, AdminToken).ListGroupsAsync());
    }

    [Fact]
    public async Task Tls_CertificateFromAnotherCa_UnauthenticatedEacces()
    {
        await using var broker = await SecureBroker.StartAsync(Auth);
        var stranger = new TestPki(Directory.CreateDirectory(Path.Combine(broker.Directory, "other")).FullName, "Some other CA");
        var e = await Expect(Errno.EACCES, StatusCode.Unauthenticated, () => broker.ConnectTls(stranger.Client("ops")).ListGroupsAsync());
        Assert.Contains("bad client certificate", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task UnixSocket_PeerUidIsThePrincipal()
    {
        await using var broker = await SecureBroker.StartAsync(Auth);
        var client = broker.ConnectUnix();
        Assert.NotEmpty((await client.ListGroupsAsync()).Groups);
        var e = await Expect(Errno.EACCES, StatusCode.PermissionDenied, () => client.OpenSessionAsync("uds"));
        Assert.Contains($"uid:{Uid()} (viewer)", e.Message, StringComparison.Ordinal);
        if (!OperatingSystem.IsWindows())
            Assert.Equal(Convert.ToString(0x1b0 /* 0660 */, 8), Convert.ToString((int)File.GetUnixFileMode(broker.Socket["unix://".Length..]), 8));
    }

    [Fact]
    public async Task Roles_UserMayNotCallAdminMethods_PermissionDeniedEacces()
    {
        await using var broker = await SecureBroker.StartAsync(Auth);
        var user = broker.Connect(UserToken);
        foreach (var call in new Func<Task>[]
        {
            () => user.Admin.BindDriverAsync("0000:08:00.0", "vfio-pci"),
            () => user.Admin.UnbindDriverAsync("0000:08:00.0"),
            () => user.Admin.AddDeviceAsync(new HotplugDevice("0000:0c:00.0", "edu")),
            () => user.Admin.RemoveDeviceAsync("0000:08:00.0"),
        })
        {
            var e = await Expect(Errno.EACCES, StatusCode.PermissionDenied, call);
            Assert.Contains("token:ci (user)", e.Message, StringComparison.Ordinal);
        }
        // Nothing changed.
        Assert.Equal("vfio-pci", (await user.ListDevicesAsync()).Devices.Single(d => d.Address == "0000:08:00.0").Driver);
    }

    [Fact]
    public async Task AuthFile_Changed_ReloadedAndBadFileKeepsTheOld()
    {
        await using var broker = await SecureBroker.StartAsync(Auth);
        var reloaded = new TaskCompletionSource<string?>(TaskCreationOptions.RunContinuationsAsynchronously);
        broker.Access.Reloaded += (_, error) => reloaded.TrySetResult(error);
        await File.WriteAllTextAsync(broker.AuthFile, Auth.Replace("\"uid:*\", \"roles\": [\"viewer\"]", "\"anonymous\", \"roles\": [\"viewer\"]", StringComparison.Ordinal));
        Assert.Null(await reloaded.Task.WaitAsync(TestBroker.Timeout));
        Assert.NotEmpty((await broker.Connect().ListGroupsAsync()).Groups);

        reloaded = new TaskCompletionSource<string?>(TaskCreationOptions.RunContinuationsAsynchronously);
        // The broker logs a rejected file as an error (AccessControl, event 301): this one is on purpose.
        broker.ExpectErrors(r => r.EventId.Id == 301 && r.Category == typeof(Hosting.AccessControl).FullName);
        await File.WriteAllTextAsync(broker.AuthFile, "{ \"principals\": [ { \"name\": \"bob\" } ] }");
        Assert.Contains("bob", await reloaded.Task.WaitAsync(TestBroker.Timeout), StringComparison.Ordinal);
        // The previous file stays in force.
        Assert.NotEmpty((await broker.Connect().ListGroupsAsync()).Groups);
    }

    /// <summary>This process's real uid, from /proc/self/status ("Uid: real effective saved fs").</summary>
    private static string Uid() =>
        File.ReadLines("/proc/self/status").First(l => l.StartsWith("Uid:", StringComparison.Ordinal)).Split('\t', StringSplitOptions.RemoveEmptyEntries)[1];
}
